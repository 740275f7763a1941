//! The interfaces of the policy and their attachments: which hook each uses, whether its
//! pinned link is live on the interface as it exists now, and re-attaching after hotplug.
//! This state machine owns the dataplane's programs (attaching is all that needs them once
//! the maps are open).

use std::collections::BTreeMap;

use aya::programs::XdpMode;
use filter_common::abi::iface_slot;
use filter_user::{
    Dataplane,
    control::InterfaceView,
    desired,
    loader::{Hook, PinLayout, detach_pinned, ifindex, pinned_link_ifindex, pinned_link_status},
    policy::{Attach, Policy, Role},
};
use tracing::{error, info, warn};

/// What the daemon knows about one policy interface.
#[derive(Clone, Debug)]
struct IfaceState {
    role: Role,
    attach: Attach,
    hook: Option<Hook>,
    ifindex: Option<u32>,
    note: String,
}

/// The policy's interfaces and what p25d knows about each.
pub struct Interfaces {
    dataplane: Dataplane,
    layout: PinLayout,
    states: BTreeMap<String, IfaceState>,
}

impl Interfaces {
    /// No interface yet: the first [`Interfaces::sync`] attaches the policy's.
    pub fn new(dataplane: Dataplane, layout: PinLayout) -> Self {
        Self {
            dataplane,
            layout,
            states: BTreeMap::new(),
        }
    }

    /// Interface slot (of the per-interface counters) → the names of the attached
    /// interfaces that use it (normally one).
    pub fn slot_names(&self) -> BTreeMap<u32, Vec<&str>> {
        let mut slot_names: BTreeMap<u32, Vec<&str>> = BTreeMap::new();
        for (name, state) in &self.states {
            if let Some(ifindex) = state.ifindex {
                slot_names
                    .entry(iface_slot(ifindex))
                    .or_default()
                    .push(name);
            }
        }
        slot_names
    }

    /// Attaches the policy's interfaces and detaches pinned links of interfaces that left
    /// the policy.
    pub fn sync(&mut self, policy: &Policy) {
        let wanted: BTreeMap<String, (Role, Attach)> = policy
            .interfaces
            .iter()
            .map(|i| (i.name.clone(), (i.role, i.attach)))
            .collect();
        for (interface, hook, _) in self.layout.pinned_links() {
            if !wanted.contains_key(&interface) {
                match detach_pinned(&self.layout, &interface, hook) {
                    Ok(_) => {
                        info!(%interface, ?hook, "detached: interface no longer in the policy")
                    }
                    Err(e) => error!(%interface, error = %e, "detaching failed"),
                }
            }
        }
        self.states.retain(|name, _| wanted.contains_key(name));
        for (name, (role, attach)) in wanted {
            let state = self.states.entry(name.clone()).or_insert(IfaceState {
                role,
                attach,
                hook: None,
                ifindex: None,
                note: String::new(),
            });
            // A role change swaps the attachment's program (in place, no gap).
            let changed = state.attach != attach || state.role != role;
            state.role = role;
            state.attach = attach;
            if changed || state.hook.is_none() {
                self.attach(&name);
            }
        }
    }

    /// Attaches (or adopts) one interface per its attach method.
    fn attach(&mut self, name: &str) {
        let Some(state) = self.states.get(name).cloned() else {
            return;
        };
        if ifindex(name).is_none() {
            let note = "interface not present; will attach when it appears".to_owned();
            if state.note != note {
                warn!(
                    interface = name,
                    "interface not present; will attach when it appears"
                );
            }
            self.set_state(name, None, None, note);
            return;
        }
        let layout = self.layout.clone();
        let dataplane = &mut self.dataplane;
        let try_hook = |dataplane: &mut Dataplane, hook: Hook| {
            dataplane.attach_pinned(
                &layout,
                name,
                hook,
                desired::dataplane_role(state.role),
                XdpMode::Driver,
            )
        };
        let (hook, result, note) = match state.attach {
            Attach::Xdp => (Hook::Xdp, try_hook(dataplane, Hook::Xdp), String::new()),
            Attach::Tc => (Hook::Tc, try_hook(dataplane, Hook::Tc), String::new()),
            Attach::Auto => match try_hook(dataplane, Hook::Xdp) {
                Ok(attached) => (Hook::Xdp, Ok(attached), String::new()),
                Err(e) => {
                    let e = format!("{:#}", anyhow::Error::from(e));
                    let note = format!("native XDP unavailable ({e}); fell back to tc");
                    warn!(interface = name, reason = %e, "native XDP unavailable; falling back to TC");
                    (Hook::Tc, try_hook(dataplane, Hook::Tc), note)
                }
            },
        };
        // A method change leaves the other hook's link pinned: remove it.
        let other = if hook == Hook::Xdp {
            Hook::Tc
        } else {
            Hook::Xdp
        };
        match result {
            Ok(attached) => {
                let _ = detach_pinned(&layout, name, other);
                info!(interface = name, ?hook, ifindex = attached.ifindex, adopted = attached.adopted, role = ?state.role, "attached");
                self.set_state(name, Some(hook), Some(attached.ifindex), note);
            }
            Err(e) => {
                let e = format!("{:#}", anyhow::Error::from(e));
                error!(interface = name, ?hook, error = %e, "attaching failed");
                self.set_state(name, None, None, format!("attach failed: {e}"));
            }
        }
    }

    fn set_state(&mut self, name: &str, hook: Option<Hook>, ifindex: Option<u32>, note: String) {
        if let Some(state) = self.states.get_mut(name) {
            state.hook = hook;
            state.ifindex = ifindex;
            state.note = note;
        }
    }

    /// Interface hotplug: re-attach an interface that appeared, or that was deleted and
    /// recreated (its old link died with it).
    pub fn check(&mut self) {
        let names: Vec<String> = self.states.keys().cloned().collect();
        for name in names {
            let Some(state) = self.states.get(&name).cloned() else {
                continue;
            };
            let now = ifindex(&name);
            let live = state
                .hook
                .map(|hook| pinned_link_ifindex(&self.layout.link(&name, hook)));
            let healthy = now.is_some() && live == Some(now) && state.ifindex == now;
            if now.is_some() && !healthy {
                info!(interface = %name, ifindex = ?now, "interface (re)appeared; attaching");
                self.attach(&name);
            } else if now.is_none() && state.ifindex.is_some() {
                warn!(interface = %name, "interface disappeared; will re-attach when it returns");
                self.set_state(&name, state.hook, None, "interface disappeared".into());
            }
        }
    }

    /// The interfaces as `p25ctl status` shows them; `attached` is checked against the
    /// pinned links now, not remembered.
    pub fn views(&self) -> Vec<InterfaceView> {
        let links = pinned_link_status(&self.layout);
        self.states
            .iter()
            .map(|(name, state)| {
                let live = links.iter().any(|l| {
                    &l.interface == name
                        && Some(l.hook) == state.hook
                        && l.ifindex.is_some()
                        && l.ifindex == state.ifindex
                });
                InterfaceView {
                    name: name.clone(),
                    role: format!("{:?}", state.role).to_lowercase(),
                    hook: state
                        .hook
                        .map(|h| format!("{h:?}").to_lowercase())
                        .unwrap_or_default(),
                    attached: live,
                    note: state.note.clone(),
                }
            })
            .collect()
    }
}
