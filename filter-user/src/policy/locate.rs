//! Where in the policy text a value is, for the rules that run after deserialization.
//!
//! First choice is the `scan` index, built once, lazily (most policies have no problem to
//! locate). What it finds is only trusted when it matches the deserialized value: the
//! scalar text is the same and every sequence on the way has the same length. Otherwise,
//! or where the scanner gave up, serde_yaml itself is asked, by deserializing the document
//! once more with a visitor that fails on purpose at the wanted node: serde_yaml stamps
//! that error with the node's position. That is exact but costs a full parse per lookup,
//! so it is rationed; past the ration a diagnostic falls back to the start of the file
//! (its message still names the offending value).

use std::{
    cell::{Cell, OnceCell},
    fmt,
};

use serde::de::{self, DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};

use super::scan::{self, Node, Pos};

/// One step of a path into the document.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Seg {
    /// The value of a mapping key.
    Key(&'static str),
    /// An item of a sequence that has `len` items.
    Index { index: usize, len: usize },
}

/// What the located node must look like for the scanner's answer to be trusted.
#[derive(Debug, Clone, Copy)]
pub(super) enum Expect<'a> {
    /// A scalar with this value.
    Text(&'a str),
    /// Anything (a collection, or a value with no simple text).
    Any,
}

/// Exact lookups through serde_yaml allowed per policy: each re-parses the whole file.
const SEEK_RATION: usize = 64;

/// Finds positions of values in one policy text.
pub(super) struct Locator<'t> {
    text: &'t str,
    tree: OnceCell<Option<Node>>,
    seeks_left: Cell<usize>,
}

impl<'t> Locator<'t> {
    pub fn new(text: &'t str) -> Self {
        Self {
            text,
            tree: OnceCell::new(),
            seeks_left: Cell::new(SEEK_RATION),
        }
    }

    fn tree(&self) -> Option<&Node> {
        self.tree.get_or_init(|| scan::scan(self.text)).as_ref()
    }

    /// Where the value at `path` starts.
    pub fn value(&self, path: &[Seg], expect: Expect<'_>) -> Pos {
        let scanned = self
            .tree()
            .and_then(|tree| find(tree, path))
            .filter(|node| match (expect, node) {
                // An alias or block scalar has no text to compare, but it is where the
                // value is written; serde_yaml would point at the anchor instead.
                (Expect::Any, _) | (Expect::Text(_), Node::Other { .. }) => true,
                (Expect::Text(text), node) => node.text() == Some(text),
            })
            .map(Node::pos);
        scanned
            .or_else(|| self.seek(path, Target::Value))
            .unwrap_or(Pos::START)
    }

    /// Where the key that ends `path` starts, or `None` if the key is absent.
    pub fn key(&self, path: &[Seg]) -> Option<Pos> {
        let Some((Seg::Key(key), parent)) = path.split_last() else {
            return None;
        };
        let scanned = self.tree().and_then(|tree| {
            let entries = find(tree, parent)?.entries()?;
            let entry = entries
                .iter()
                .find(|entry| entry.key.as_deref() == Some(*key))?;
            Some(entry.key_pos)
        });
        scanned.or_else(|| self.seek(path, Target::Key))
    }

    fn seek(&self, path: &[Seg], target: Target) -> Option<Pos> {
        let left = self.seeks_left.get();
        if left == 0 {
            return None;
        }
        self.seeks_left.set(left - 1);
        seek(self.text, path, target)
    }
}

/// Asks serde_yaml where the node (or key) at `path` is; `None` if there is no such node.
fn seek(text: &str, path: &[Seg], target: Target) -> Option<Pos> {
    let error = Seek { path, target }
        .deserialize(serde_yaml::Deserializer::from_str(text))
        .err()?;
    if !error.to_string().contains(FOUND) {
        return None;
    }
    let location = error.location()?;
    Some(Pos {
        line: location.line(),
        column: location.column(),
    })
}

/// The node at `path` in the scanned tree; sequences must have the expected length, which
/// guards against the scanner having split or merged items.
fn find<'n>(mut node: &'n Node, path: &[Seg]) -> Option<&'n Node> {
    for seg in path {
        node = match *seg {
            Seg::Key(key) => {
                &node
                    .entries()?
                    .iter()
                    .find(|entry| entry.key.as_deref() == Some(key))?
                    .value
            }
            Seg::Index { index, len } => {
                let items = node.items()?;
                if items.len() != len {
                    return None;
                }
                items.get(index)?
            }
        };
    }
    Some(node)
}

/// The message of the deliberate error; nothing else produces it.
const FOUND: &str = "p25 policy locator: found the node";

#[derive(Debug, Clone, Copy)]
enum Target {
    Value,
    Key,
}

/// Walks the document along `path` and fails inside the deserialization of the node
/// sought, so that serde_yaml attaches that node's position to the error.
struct Seek<'p> {
    path: &'p [Seg],
    target: Target,
}

impl<'de> DeserializeSeed<'de> for Seek<'_> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        match self.path.split_first() {
            None => deserializer.deserialize_any(Found),
            Some((&Seg::Key(key), rest)) => deserializer.deserialize_any(InMap {
                key,
                rest,
                target: self.target,
            }),
            Some((&Seg::Index { index, .. }, rest)) => deserializer.deserialize_any(InSeq {
                index,
                rest,
                target: self.target,
            }),
        }
    }
}

struct InMap<'p> {
    key: &'static str,
    rest: &'p [Seg],
    target: Target,
}

impl<'de> Visitor<'de> for InMap<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a mapping")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let key_sought = self.rest.is_empty() && matches!(self.target, Target::Key);
        while let Some(matches) = map.next_key_seed(KeySeed {
            key: self.key,
            fail: key_sought,
        })? {
            if matches {
                map.next_value_seed(Seek {
                    path: self.rest,
                    target: self.target,
                })?;
            } else {
                map.next_value::<IgnoredAny>()?;
            }
        }
        Ok(())
    }
}

struct InSeq<'p> {
    index: usize,
    rest: &'p [Seg],
    target: Target,
}

impl<'de> Visitor<'de> for InSeq<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a sequence")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let mut index = 0;
        loop {
            let more = if index == self.index {
                seq.next_element_seed(Seek {
                    path: self.rest,
                    target: self.target,
                })?
                .is_some()
            } else {
                seq.next_element::<IgnoredAny>()?.is_some()
            };
            if !more {
                return Ok(());
            }
            index += 1;
        }
    }
}

/// Reads a mapping key: whether it is the one sought, failing on it if `fail`.
struct KeySeed {
    key: &'static str,
    fail: bool,
}

impl<'de> DeserializeSeed<'de> for KeySeed {
    type Value = bool;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<bool, D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for KeySeed {
    type Value = bool;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a mapping key")
    }

    fn visit_str<E: de::Error>(self, key: &str) -> Result<bool, E> {
        if key != self.key {
            Ok(false)
        } else if self.fail {
            Err(E::custom(FOUND))
        } else {
            Ok(true)
        }
    }

    // Keys of other types are never the one sought.
    fn visit_bool<E: de::Error>(self, _: bool) -> Result<bool, E> {
        Ok(false)
    }

    fn visit_i64<E: de::Error>(self, _: i64) -> Result<bool, E> {
        Ok(false)
    }

    fn visit_u64<E: de::Error>(self, _: u64) -> Result<bool, E> {
        Ok(false)
    }

    fn visit_f64<E: de::Error>(self, _: f64) -> Result<bool, E> {
        Ok(false)
    }

    fn visit_unit<E: de::Error>(self) -> Result<bool, E> {
        Ok(false)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<bool, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(false)
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<bool, A::Error> {
        while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
        Ok(false)
    }
}

/// Fails on whatever node it is given.
struct Found;

impl<'de> Visitor<'de> for Found {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("the node sought")
    }

    fn visit_bool<E: de::Error>(self, _: bool) -> Result<(), E> {
        Err(E::custom(FOUND))
    }

    fn visit_i64<E: de::Error>(self, _: i64) -> Result<(), E> {
        Err(E::custom(FOUND))
    }

    fn visit_i128<E: de::Error>(self, _: i128) -> Result<(), E> {
        Err(E::custom(FOUND))
    }

    fn visit_u64<E: de::Error>(self, _: u64) -> Result<(), E> {
        Err(E::custom(FOUND))
    }

    fn visit_u128<E: de::Error>(self, _: u128) -> Result<(), E> {
        Err(E::custom(FOUND))
    }

    fn visit_f64<E: de::Error>(self, _: f64) -> Result<(), E> {
        Err(E::custom(FOUND))
    }

    fn visit_str<E: de::Error>(self, _: &str) -> Result<(), E> {
        Err(E::custom(FOUND))
    }

    fn visit_bytes<E: de::Error>(self, _: &[u8]) -> Result<(), E> {
        Err(E::custom(FOUND))
    }

    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        Err(E::custom(FOUND))
    }

    fn visit_none<E: de::Error>(self) -> Result<(), E> {
        Err(E::custom(FOUND))
    }

    fn visit_some<D: Deserializer<'de>>(self, _: D) -> Result<(), D::Error> {
        Err(de::Error::custom(FOUND))
    }

    fn visit_newtype_struct<D: Deserializer<'de>>(self, _: D) -> Result<(), D::Error> {
        Err(de::Error::custom(FOUND))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, _: A) -> Result<(), A::Error> {
        Err(de::Error::custom(FOUND))
    }

    fn visit_map<A: MapAccess<'de>>(self, _: A) -> Result<(), A::Error> {
        Err(de::Error::custom(FOUND))
    }

    fn visit_enum<A: de::EnumAccess<'de>>(self, _: A) -> Result<(), A::Error> {
        Err(de::Error::custom(FOUND))
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    /// Valid YAML in the shapes policies take, and some they rarely do.
    const SAMPLES: &[&str] = &[
        "version: 1\nsubscribers:\n- prefix: 100.64.0.0/10\n  mode: monitor\n- {prefix: \
         '2001:db8::/32', mode: enforce}\n",
        "# c\n---\nversion: 1 # trailing\ndefaults:\n  ports: [ 25 ,\n    25 ]\n  mode:   \
         monitor\nsubscribers:\n  -   prefix: \"100.64.0.0/10\"\n  -\n    prefix: \
         198.51.100.0/24\n",
        "version: 1\r\nsubscribers:\r\n  - prefix: 100.64.0.0/10\r\n  - prefix: \
         198.51.100.0/24\r\n",
        "\u{feff}version: 1\nallow:\n  - prefix: 192.0.2.25\n    comment: |\n      line one\n \
         \n      line two\n\n    owner: ops\n",
        "version: 1\nallow:\n  - prefix: 192.0.2.25\n    comment: a plain\n      comment on \
         two lines\n    owner: 'it''s me'\n",
        "version: 1\nsubscribers: [\n  { prefix: 100.64.0.0/10 },\n  {\n    prefix: \
         \"2001:db8::/32\",\n    mode: monitor\n  }\n]\n",
        "version:\t1\nsubscribers:\n  - prefix:\t100.64.0.0/10\n",
        "version: 1\nallow:\n  - {comment: \"Café ☕\", prefix: 192.0.2.9}\n  - comment: \
         \"esc\\\"aped\"\n    prefix: 192.0.2.10\n",
        "x: &a\n  - 1\n  - 2\ny: *a\nz: !!str 3\nw: &b !!str v\n",
        "a:\n  b:\n    c: [1, [2, 3], {d: e}]\n  f: >-\n    folded\n    text\n  g: ''\nh: \"\"\n",
        "a:\n- b: 1\n  c:\n  - 2\n  - - 3\n    - 4\nd: {e: , f}\n",
        "\"quoted key\": 1\n'single': {\"x\":1, 'y' : 2}\nplain key : 3\n",
    ];

    fn leak(key: &str) -> &'static str {
        Box::leak(key.to_owned().into_boxed_str())
    }

    /// Compares every position the scanner found with what serde_yaml reports.
    fn cross_check(
        text: &str,
        path: &mut Vec<Seg>,
        node: &Node,
        mismatches: &mut Vec<String>,
        compared: &mut usize,
    ) {
        let mut compare = |what: &str, path: &[Seg], target, scanned: Pos| {
            *compared += 1;
            let exact = seek(text, path, target);
            if exact != Some(scanned) {
                mismatches.push(format!(
                    "{what} at {path:?}: scanner {scanned:?}, serde_yaml {exact:?}"
                ));
            }
        };
        // An alias's events are the anchor's; an empty value has no token.
        if !matches!(node, Node::Other { .. } | Node::Empty { .. }) {
            compare("value", path, Target::Value, node.pos());
        }
        for entry in node.entries().unwrap_or_default() {
            if let Some(key) = &entry.key {
                path.push(Seg::Key(leak(key)));
                compare("key", path, Target::Key, entry.key_pos);
                path.pop();
            }
        }
        for entry in node.entries().unwrap_or_default() {
            if let Some(key) = &entry.key {
                path.push(Seg::Key(leak(key)));
                cross_check(text, path, &entry.value, mismatches, compared);
                path.pop();
            }
        }
        let items = node.items().unwrap_or_default();
        for (index, item) in items.iter().enumerate() {
            path.push(Seg::Index {
                index,
                len: items.len(),
            });
            cross_check(text, path, item, mismatches, compared);
            path.pop();
        }
    }

    fn yaml_files(dir: &Path) -> Vec<(String, String)> {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return Vec::new();
        };
        entries
            .filter_map(Result::ok)
            .map(|entry| entry.path())
            .filter(|path| path.extension().is_some_and(|ext| ext == "yaml"))
            .filter_map(|path| {
                let text = std::fs::read_to_string(&path).ok()?;
                Some((path.display().to_string(), text))
            })
            .collect()
    }

    #[test]
    fn scanner_agrees_with_serde_yaml() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let mut texts: Vec<(String, String)> = SAMPLES
            .iter()
            .enumerate()
            .map(|(i, text)| (format!("sample {i}"), (*text).to_owned()))
            .collect();
        texts.extend(yaml_files(&root.join("policies")));
        texts.extend(yaml_files(&root.join("tests/policies/bad")));
        let mut mismatches = Vec::new();
        let mut scanned = 0;
        let mut compared = 0;
        for (name, text) in &texts {
            // Only valid YAML is ever scanned.
            if serde_yaml::from_str::<serde_yaml::Value>(text).is_err() {
                continue;
            }
            let Some(tree) = scan::scan(text) else {
                mismatches.push(format!("{name}: the scanner gave up"));
                continue;
            };
            scanned += 1;
            let mut found = Vec::new();
            cross_check(text, &mut Vec::new(), &tree, &mut found, &mut compared);
            mismatches.extend(found.into_iter().map(|m| format!("{name}: {m}")));
        }
        assert!(scanned >= SAMPLES.len(), "only {scanned} texts scanned");
        assert!(compared >= 500, "only {compared} positions compared");
        assert!(mismatches.is_empty(), "{}", mismatches.join("\n"));
    }

    #[test]
    fn unsupported_yaml_is_located_through_serde_yaml() {
        // A complex key makes the scanner give up; the locator must still be exact.
        let text = "? [complex]\n: key\nsubscribers:\n  - prefix: 10.0.0.1/8\n";
        assert!(scan::scan(text).is_none());
        let locator = Locator::new(text);
        let path = [
            Seg::Key("subscribers"),
            Seg::Index { index: 0, len: 1 },
            Seg::Key("prefix"),
        ];
        assert_eq!(
            locator.value(&path, Expect::Text("10.0.0.1/8")),
            Pos {
                line: 4,
                column: 13
            }
        );
        assert_eq!(
            locator.key(&[Seg::Key("subscribers")]),
            Some(Pos { line: 3, column: 1 })
        );
        assert_eq!(locator.key(&[Seg::Key("allow")]), None);
    }

    #[test]
    fn a_scanned_value_that_does_not_match_is_not_trusted() {
        let text = "subscribers:\n  - prefix: 10.0.0.0/8\n  - prefix: 10.0.0.0/8\n";
        let locator = Locator::new(text);
        let second = [
            Seg::Key("subscribers"),
            Seg::Index { index: 1, len: 2 },
            Seg::Key("prefix"),
        ];
        assert_eq!(
            locator.value(&second, Expect::Text("10.0.0.0/8")),
            Pos {
                line: 3,
                column: 13
            }
        );
        // A list length that disagrees with the parsed one: asked of serde_yaml, which
        // still finds index 1.
        let wrong_len = [
            Seg::Key("subscribers"),
            Seg::Index { index: 1, len: 3 },
            Seg::Key("prefix"),
        ];
        assert_eq!(
            locator.value(&wrong_len, Expect::Text("10.0.0.0/8")),
            Pos {
                line: 3,
                column: 13
            }
        );
        // Nowhere to be found: the start of the file.
        let missing = [Seg::Key("allow"), Seg::Index { index: 0, len: 1 }];
        assert_eq!(locator.value(&missing, Expect::Any), Pos::START);
    }

    #[test]
    fn exact_lookups_are_rationed() {
        let text = "? [complex]\n: key\nversion: 1\n";
        let locator = Locator::new(text);
        for _ in 0..SEEK_RATION {
            assert_eq!(
                locator.value(&[Seg::Key("version")], Expect::Text("1")),
                Pos {
                    line: 3,
                    column: 10
                }
            );
        }
        assert_eq!(
            locator.value(&[Seg::Key("version")], Expect::Text("1")),
            Pos::START
        );
    }
}
