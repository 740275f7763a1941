//! The shared test topology: a subscriber, a border router and an "internet" server, each
//! in its own network namespace (unique names, deleted on drop).
//!
//! ```text
//!   sub netns                      router netns                        server netns
//!   s0 ─────────────────────── r-sub               r-up ──────────────────────── u0
//!   100.64.1.2   (subscriber)   100.64.1.1          198.51.100.1          198.51.100.25
//!   100.64.1.3   (allowlisted)  192.0.2.1                                 listens on
//!   192.0.2.10   (not a sub.)   2001:db8:1::1       2001:db8:2::1         25, 587, 465
//!   2001:db8:1::2 / ::3         2001:db8:ff::1                            2001:db8:2::25
//!   2001:db8:ff::10
//!   listens on 2525
//! ```

use std::{
    net::{Ipv4Addr, Ipv6Addr},
    time::Duration,
};

use anyhow::Result;

use crate::netns::{Listener, Netns, dual_stack, veth};

/// Upper bound on the listener threads' life, should a test hang.
pub const LISTENER_LIFETIME: Duration = Duration::from_secs(120);

pub const SMTP: u16 = 25;
pub const SUBMISSION: u16 = 587;
pub const SUBMISSIONS: u16 = 465;
/// What the subscriber listens on, for the inbound rule.
pub const SUB_PORT: u16 = 2525;

/// [`POLICY_HEAD`] as a literal, for [`lab_policy!`](crate::lab_policy).
#[doc(hidden)]
#[macro_export]
macro_rules! __lab_policy_head {
    () => {
        "version: 1
interfaces:
  - name: r-sub
    role: subscriber
    attach: xdp
  - name: r-up
    role: upstream
    attach: tc
"
    };
}

/// A whole policy for this topology, as a `&'static str`: [`POLICY_HEAD`], the lab's
/// subscriber space (100.64.1.0/24 and 2001:db8:1::/64), then the given sections
/// (literals: `defaults:`, `allow:`, in that order if both), so that the test files do not
/// each spell out the same policy.
#[macro_export]
macro_rules! lab_policy {
    ($($section:expr),* $(,)?) => {
        concat!(
            $crate::__lab_policy_head!(),
            "subscribers:\n  - prefix: 100.64.1.0/24\n  - prefix: 2001:db8:1::/64\n",
            $($section),*
        )
    };
}

/// The start of a policy for this topology: version and interfaces (native XDP on the
/// subscriber side, TC upstream). Tests append their `subscribers:` and `allow:`, or use
/// [`lab_policy!`](crate::lab_policy) for the usual subscriber space.
pub const POLICY_HEAD: &str = __lab_policy_head!();

/// The `allow:` section most lab policies start with: [`SUB4_ALLOWED`], a business
/// customer. A literal, for [`lab_policy!`](crate::lab_policy).
#[macro_export]
macro_rules! lab_allow_business {
    () => {
        "allow:\n  - prefix: 100.64.1.3/32\n    comment: business customer\n"
    };
}

// Subscriber side.
pub const SUB4: Ipv4Addr = Ipv4Addr::new(100, 64, 1, 2);
pub const SUB4_ALLOWED: Ipv4Addr = Ipv4Addr::new(100, 64, 1, 3);
pub const OUTSIDER4: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 10);
pub const SUB6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, 2);
pub const SUB6_ALLOWED: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, 3);
pub const OUTSIDER6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0xff, 0, 0, 0, 0, 0x10);
// Router.
pub const GW_SUB4: Ipv4Addr = Ipv4Addr::new(100, 64, 1, 1);
pub const GW_OUTSIDER4: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);
pub const GW_UP4: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 1);
pub const GW_SUB6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, 1);
pub const GW_OUTSIDER6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0xff, 0, 0, 0, 0, 1);
pub const GW_UP6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 2, 0, 0, 0, 0, 1);
// Server.
pub const SERVER4: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 25);
pub const SERVER6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 2, 0, 0, 0, 0, 0x25);

/// The three namespaces, wired and addressed, with the listeners running. Fields drop in
/// declaration order: the listeners' sockets first, then the namespaces.
#[derive(Debug)]
pub struct Topology {
    _server_listener: Listener,
    _sub_listener: Listener,
    /// The server (internet) namespace.
    pub server: Netns,
    /// The border router namespace.
    pub router: Netns,
    /// The subscriber namespace.
    pub sub: Netns,
}

impl Topology {
    /// Creates, wires and addresses the namespaces and starts the listeners.
    pub fn build() -> Result<Self> {
        let sub = Netns::new("sub")?;
        let router = Netns::new("rtr")?;
        let server = Netns::new("srv")?;
        veth(&sub, "s0", &router, "r-sub")?;
        veth(&router, "r-up", &server, "u0")?;

        address_subscriber_link(&sub, &router)?;
        add_addrs(
            &router,
            "r-up",
            &[format!("{GW_UP4}/24"), format!("{GW_UP6}/64")],
        )?;
        add_addrs(
            &server,
            "u0",
            &[format!("{SERVER4}/24"), format!("{SERVER6}/64")],
        )?;
        server.add_route("default", &GW_UP4.to_string())?;
        server.add_route("default", &GW_UP6.to_string())?;
        router.enable_forwarding()?;

        let server_listener = server.listen(
            &[
                dual_stack(SMTP),
                dual_stack(SUBMISSION),
                dual_stack(SUBMISSIONS),
            ],
            LISTENER_LIFETIME,
        )?;
        let sub_listener = sub.listen(&[dual_stack(SUB_PORT)], LISTENER_LIFETIME)?;
        Ok(Self {
            _server_listener: server_listener,
            _sub_listener: sub_listener,
            server,
            router,
            sub,
        })
    }
}

impl Topology {
    /// Deletes the subscriber link (both veth ends vanish) and creates it again with the
    /// same names and addresses: an interface that disappears and comes back.
    pub fn recreate_subscriber_link(&self) -> Result<()> {
        self.router.ip(&["link", "del", "r-sub"])?;
        veth(&self.sub, "s0", &self.router, "r-sub")?;
        address_subscriber_link(&self.sub, &self.router)
    }
}

/// Addresses both ends of the subscriber link and routes the subscriber through the
/// router.
fn address_subscriber_link(sub: &Netns, router: &Netns) -> Result<()> {
    add_addrs(
        sub,
        "s0",
        &[
            format!("{SUB4}/24"),
            format!("{SUB4_ALLOWED}/24"),
            format!("{OUTSIDER4}/24"),
            format!("{SUB6}/64"),
            format!("{SUB6_ALLOWED}/64"),
            format!("{OUTSIDER6}/64"),
        ],
    )?;
    add_addrs(
        router,
        "r-sub",
        &[
            format!("{GW_SUB4}/24"),
            format!("{GW_OUTSIDER4}/24"),
            format!("{GW_SUB6}/64"),
            format!("{GW_OUTSIDER6}/64"),
        ],
    )?;
    sub.add_route("default", &GW_SUB4.to_string())?;
    sub.add_route("default", &GW_SUB6.to_string())
}

fn add_addrs(netns: &Netns, dev: &str, addrs: &[String]) -> Result<()> {
    addrs.iter().try_for_each(|addr| netns.add_addr(dev, addr))
}
