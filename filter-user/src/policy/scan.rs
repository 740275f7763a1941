//! A position index over the YAML that policies are written in.
//!
//! serde_yaml reports where a value is only when deserializing it fails, but the rules that
//! compare entries (duplicates, coverage, empty lists) run after deserialization succeeded.
//! This scanner rebuilds the document's tree with the position of every node, following
//! libyaml's rules for the constructs policies use: block and flow collections, plain and
//! quoted scalars, comments, anchors and tags, block scalars. Anything else (complex keys,
//! directives, flow collections as keys) gives up rather than guess; `locate` then asks
//! serde_yaml itself. Positions follow libyaml: 1-based lines, columns counted in
//! characters, a tab counting as one column, a node with an anchor or tag starting at it.
//!
//! The scanner only ever sees text that serde_yaml has already parsed successfully, so it
//! does not diagnose malformed YAML; it only must not misplace anything in valid YAML, and
//! callers check what it found against the parsed values.

/// A position in the text, as a compiler prints it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Pos {
    /// 1-based line.
    pub line: usize,
    /// 1-based column, in characters.
    pub column: usize,
}

impl Pos {
    /// The start of the file: where a problem with the file as a whole is reported.
    pub const START: Self = Self { line: 1, column: 1 };
}

/// A node of the document, with where it starts.
#[derive(Debug)]
pub(super) enum Node {
    /// A scalar. `text` is its value when it is written on one line without escapes, and
    /// `None` when the scanner does not decode it (folding, escapes).
    Scalar { pos: Pos, text: Option<String> },
    /// A value left empty (null), which has no token of its own: `pos` is only roughly
    /// where it would be.
    Empty { pos: Pos },
    /// A block or flow sequence.
    Seq { pos: Pos, items: Vec<Node> },
    /// A block or flow mapping.
    Map { pos: Pos, entries: Vec<Entry> },
    /// An alias or a block scalar: located, but not looked into.
    Other { pos: Pos },
}

/// A key and its value.
#[derive(Debug)]
pub(super) struct Entry {
    /// Where the key starts.
    pub key_pos: Pos,
    /// The key, if it is a simple scalar.
    pub key: Option<String>,
    /// The value.
    pub value: Node,
}

impl Node {
    /// Where the node starts.
    pub fn pos(&self) -> Pos {
        match self {
            Self::Scalar { pos, .. }
            | Self::Empty { pos }
            | Self::Seq { pos, .. }
            | Self::Map { pos, .. }
            | Self::Other { pos } => *pos,
        }
    }

    /// The scalar's value, if decoded.
    pub fn text(&self) -> Option<&str> {
        match self {
            Self::Scalar { text, .. } => text.as_deref(),
            _ => None,
        }
    }

    /// The entries, if a mapping.
    pub fn entries(&self) -> Option<&[Entry]> {
        match self {
            Self::Map { entries, .. } => Some(entries),
            _ => None,
        }
    }

    /// The items, if a sequence.
    pub fn items(&self) -> Option<&[Node]> {
        match self {
            Self::Seq { items, .. } => Some(items),
            _ => None,
        }
    }

    /// The same node, said to start at `pos` (where its anchor or tag is).
    fn starting_at(mut self, at: Pos) -> Self {
        match &mut self {
            Self::Scalar { pos, .. }
            | Self::Empty { pos }
            | Self::Seq { pos, .. }
            | Self::Map { pos, .. }
            | Self::Other { pos } => *pos = at,
        }
        self
    }
}

/// Builds the tree of `text`, or `None` if it uses a construct outside the subset.
pub(super) fn scan(text: &str) -> Option<Node> {
    // libyaml also breaks lines at NEL, LS and PS; rather than follow it there, give up.
    if text.contains(['\u{85}', '\u{2028}', '\u{2029}']) {
        return None;
    }
    Scanner::new(text).document().ok()
}

/// The text uses a construct this scanner does not follow.
struct Unsupported;

type Scanned<T> = Result<T, Unsupported>;

struct Scanner<'a> {
    bytes: &'a [u8],
    i: usize,
    /// 0-based, like libyaml's marks.
    line: usize,
    /// 0-based, in characters.
    col: usize,
}

fn is_blank(c: Option<u8>) -> bool {
    matches!(c, Some(b' ' | b'\t'))
}

fn is_break(c: Option<u8>) -> bool {
    matches!(c, Some(b'\n' | b'\r'))
}

fn is_blankz(c: Option<u8>) -> bool {
    matches!(c, None | Some(b' ' | b'\t' | b'\n' | b'\r'))
}

/// Whether the rest of a line holds no value: nothing, or only a comment.
fn ends_line(c: Option<u8>) -> bool {
    matches!(c, None | Some(b'#' | b'\n' | b'\r'))
}

impl<'a> Scanner<'a> {
    fn new(text: &'a str) -> Self {
        Self {
            bytes: text.as_bytes(),
            i: 0,
            line: 0,
            col: 0,
        }
    }

    fn cur(&self) -> Option<u8> {
        self.bytes.get(self.i).copied()
    }

    fn peek(&self, ahead: usize) -> Option<u8> {
        self.bytes.get(self.i + ahead).copied()
    }

    fn pos(&self) -> Pos {
        Pos {
            line: self.line + 1,
            column: self.col + 1,
        }
    }

    fn line_col(&self) -> isize {
        self.col as isize
    }

    fn bump(&mut self) {
        let Some(c) = self.cur() else {
            return;
        };
        self.i += 1;
        match c {
            b'\n' => {
                self.line += 1;
                self.col = 0;
            }
            // A CR ends a line unless a LF follows, which then does.
            b'\r' => {
                if self.cur() != Some(b'\n') {
                    self.line += 1;
                    self.col = 0;
                }
            }
            // UTF-8 continuation bytes belong to the character already counted.
            c if c & 0xC0 == 0x80 => {}
            _ => self.col += 1,
        }
    }

    fn skip_blanks(&mut self) {
        while is_blank(self.cur()) {
            self.bump();
        }
    }

    /// Moves to the end of the line (onto its line break, if any).
    fn skip_line(&mut self) {
        while !matches!(self.cur(), None | Some(b'\n' | b'\r')) {
            self.bump();
        }
    }

    /// Skips whitespace, line breaks and comments up to the next token. Only called
    /// between tokens, where a `#` always starts a comment.
    fn skip_space(&mut self) {
        loop {
            match self.cur() {
                Some(b' ' | b'\t' | b'\n' | b'\r') => self.bump(),
                Some(b'#') => self.skip_line(),
                _ => break,
            }
        }
    }

    fn at_marker(&self, marker: &[u8]) -> bool {
        self.col == 0
            && self.bytes.get(self.i..self.i + 3) == Some(marker)
            && is_blankz(self.peek(3))
    }

    fn at_document_boundary(&self) -> bool {
        self.cur().is_none() || self.at_marker(b"---") || self.at_marker(b"...")
    }

    fn document(mut self) -> Scanned<Node> {
        // libyaml drops a byte order mark without counting it as a column.
        if self.bytes.starts_with("\u{feff}".as_bytes()) {
            self.i = 3;
        }
        self.skip_space();
        if self.cur() == Some(b'%') {
            return Err(Unsupported);
        }
        if self.at_marker(b"---") {
            for _ in 0..3 {
                self.bump();
            }
            self.skip_space();
        }
        if self.at_document_boundary() {
            return Ok(Node::Empty { pos: self.pos() });
        }
        self.node(-1)
    }

    /// Skips anchors and tags; whether there were any.
    fn properties(&mut self, flow: bool) -> bool {
        let mut any = false;
        while matches!(self.cur(), Some(b'&' | b'!')) {
            any = true;
            self.skip_name(flow);
            if flow {
                self.skip_space();
            } else {
                self.skip_blanks();
            }
        }
        any
    }

    /// Skips an anchor, alias or tag token.
    fn skip_name(&mut self, flow: bool) {
        loop {
            let c = self.cur();
            if is_blankz(c) || (flow && matches!(c, Some(b',' | b'[' | b']' | b'{' | b'}'))) {
                break;
            }
            self.bump();
        }
    }

    /// A node in block context starting at the current token. Its content must be
    /// indented deeper than `parent`, the indentation of the enclosing block collection.
    fn node(&mut self, parent: isize) -> Scanned<Node> {
        let pos = self.pos();
        let col = self.line_col();
        let has_properties = self.properties(false);
        if has_properties && ends_line(self.cur()) {
            // The content is on the next lines, and the node starts at its properties.
            return Ok(self.block_value(parent, false)?.starting_at(pos));
        }
        match self.cur() {
            Some(b'-') if is_blankz(self.peek(1)) => {
                if has_properties {
                    return Err(Unsupported);
                }
                self.block_seq(col)
            }
            Some(b'[' | b'{') => {
                let node = self.flow_node()?;
                self.skip_blanks();
                if self.cur() == Some(b':') {
                    return Err(Unsupported);
                }
                Ok(node.starting_at(pos))
            }
            Some(b'*') => {
                self.skip_name(false);
                self.skip_blanks();
                if self.cur() == Some(b':') {
                    return Err(Unsupported);
                }
                Ok(Node::Other { pos })
            }
            Some(b'|' | b'>') => {
                self.block_scalar(parent);
                Ok(Node::Other { pos })
            }
            Some(b'?') if is_blankz(self.peek(1)) => Err(Unsupported),
            Some(b'"' | b'\'') => {
                let line = self.line;
                let text = self.quoted()?;
                let single_line = self.line == line;
                self.skip_blanks();
                if self.cur() == Some(b':') && is_blankz(self.peek(1)) {
                    if has_properties || !single_line {
                        return Err(Unsupported);
                    }
                    return self.block_map(col, pos, text);
                }
                Ok(Node::Scalar { pos, text })
            }
            _ => {
                let (text, is_key) = self.plain(false, parent);
                if is_key {
                    if has_properties {
                        return Err(Unsupported);
                    }
                    return self.block_map(col, pos, text);
                }
                Ok(Node::Scalar { pos, text })
            }
        }
    }

    /// A value that did not start on its key's or dash's line: a node on a following line
    /// if indented enough (or, for a mapping value, a sequence at the key's indentation),
    /// otherwise empty (null).
    fn block_value(&mut self, parent: isize, indentless_sequence: bool) -> Scanned<Node> {
        let here = self.pos();
        self.skip_space();
        if self.at_document_boundary() {
            return Ok(Node::Empty { pos: here });
        }
        let col = self.line_col();
        let sequence_here = self.cur() == Some(b'-') && is_blankz(self.peek(1));
        if col > parent || (indentless_sequence && col == parent && sequence_here) {
            self.node(parent)
        } else {
            Ok(Node::Empty { pos: here })
        }
    }

    /// A block mapping whose first key (at column `col`, position `pos`) was just read;
    /// the scanner is on that key's `:`.
    fn block_map(&mut self, col: isize, pos: Pos, first_key: Option<String>) -> Scanned<Node> {
        let mut entries = Vec::new();
        let mut key_pos = pos;
        let mut key = first_key;
        loop {
            self.bump(); // ':'
            self.skip_blanks();
            let value = if ends_line(self.cur()) {
                self.block_value(col, true)?
            } else {
                self.node(col)?
            };
            entries.push(Entry {
                key_pos,
                key,
                value,
            });
            self.skip_space();
            if self.at_document_boundary() || self.line_col() < col {
                break;
            }
            if self.line_col() > col {
                return Err(Unsupported);
            }
            key_pos = self.pos();
            key = match self.cur() {
                Some(b'"' | b'\'') => {
                    let line = self.line;
                    let text = self.quoted()?;
                    if self.line != line {
                        return Err(Unsupported);
                    }
                    self.skip_blanks();
                    text
                }
                Some(b'-' | b'?' | b':') if is_blankz(self.peek(1)) => return Err(Unsupported),
                Some(
                    b'[' | b'{' | b'*' | b'&' | b'!' | b'|' | b'>' | b'%' | b'@' | b'`' | b','
                    | b']' | b'}',
                ) => return Err(Unsupported),
                _ => {
                    let (text, is_key) = self.plain(false, col);
                    if !is_key {
                        return Err(Unsupported);
                    }
                    text
                }
            };
            if !(self.cur() == Some(b':') && is_blankz(self.peek(1))) {
                return Err(Unsupported);
            }
        }
        Ok(Node::Map { pos, entries })
    }

    /// A block sequence whose dashes are at column `col`; the scanner is on the first.
    fn block_seq(&mut self, col: isize) -> Scanned<Node> {
        let pos = self.pos();
        let mut items = Vec::new();
        loop {
            self.bump(); // '-'
            self.skip_blanks();
            let item = if ends_line(self.cur()) {
                self.block_value(col, false)?
            } else {
                self.node(col)?
            };
            items.push(item);
            self.skip_space();
            if self.at_document_boundary()
                || self.line_col() != col
                || !(self.cur() == Some(b'-') && is_blankz(self.peek(1)))
            {
                break;
            }
        }
        Ok(Node::Seq { pos, items })
    }

    /// Skips a literal or folded block scalar: its header line, then every line that is
    /// blank or indented deeper than `parent`.
    fn block_scalar(&mut self, parent: isize) {
        self.skip_line();
        while is_break(self.cur()) {
            let crlf = self.cur() == Some(b'\r') && self.peek(1) == Some(b'\n');
            self.bump();
            if crlf {
                self.bump();
            }
            let line_start = (self.i, self.line, self.col);
            let mut indent: isize = 0;
            while self.cur() == Some(b' ') {
                self.bump();
                indent += 1;
            }
            self.skip_blanks();
            match self.cur() {
                None => break,
                Some(b'\n' | b'\r') => {}
                Some(_) if indent > parent => self.skip_line(),
                Some(_) => {
                    (self.i, self.line, self.col) = line_start;
                    break;
                }
            }
        }
    }

    /// A single- or double-quoted scalar; the scanner is on the opening quote. Returns
    /// its value unless it has escapes or spans lines.
    fn quoted(&mut self) -> Scanned<Option<String>> {
        let quote = self.cur();
        self.bump();
        let mut text = Some(Vec::new());
        loop {
            match self.cur() {
                None => return Err(Unsupported),
                Some(b'\'') if quote == Some(b'\'') && self.peek(1) == Some(b'\'') => {
                    if let Some(text) = &mut text {
                        text.push(b'\'');
                    }
                    self.bump();
                    self.bump();
                }
                c if c == quote => {
                    self.bump();
                    break;
                }
                Some(b'\\') if quote == Some(b'"') => {
                    text = None;
                    self.bump();
                    self.bump();
                }
                Some(b'\n' | b'\r') => {
                    text = None;
                    self.bump();
                }
                Some(c) => {
                    if let Some(text) = &mut text {
                        text.push(c);
                    }
                    self.bump();
                }
            }
        }
        Ok(text.and_then(|text| String::from_utf8(text).ok()))
    }

    /// A plain scalar, following libyaml's `scan_plain_scalar`. In block context it may
    /// continue on following lines indented deeper than `parent`. Returns its value (unless
    /// it spans lines) and whether it is a mapping key: on one line, followed by `: `.
    fn plain(&mut self, flow: bool, parent: isize) -> (Option<String>, bool) {
        let start_line = self.line;
        let mut text = Vec::new();
        let mut multiline = false;
        let mut joint: Vec<u8> = Vec::new();
        loop {
            let mut first = true;
            loop {
                let c = self.cur();
                let ends = match c {
                    None | Some(b' ' | b'\t' | b'\n' | b'\r') => true,
                    Some(b':') => {
                        is_blankz(self.peek(1))
                            || (flow
                                && matches!(
                                    self.peek(1),
                                    Some(b',' | b'?' | b'[' | b']' | b'{' | b'}')
                                ))
                    }
                    Some(b',' | b'[' | b']' | b'{' | b'}') => flow,
                    Some(_) => false,
                };
                let Some(c) = c.filter(|_| !ends) else {
                    break;
                };
                if first {
                    first = false;
                    if self.line != start_line {
                        multiline = true;
                    }
                    text.append(&mut joint);
                }
                text.push(c);
                self.bump();
            }
            if !(is_blank(self.cur()) || is_break(self.cur())) {
                break;
            }
            // Whitespace inside a line is part of the value if more follows on the line;
            // a line break folds, which this scanner does not decode.
            let line = self.line;
            joint.clear();
            while is_blank(self.cur()) || is_break(self.cur()) {
                if self.line == line
                    && let Some(c) = self.cur().filter(|_| is_blank(self.cur()))
                {
                    joint.push(c);
                }
                self.bump();
            }
            if self.at_document_boundary() || self.cur() == Some(b'#') {
                break;
            }
            if self.line != line && !flow && self.line_col() <= parent {
                break;
            }
        }
        let is_key = !flow
            && !multiline
            && self.line == start_line
            && self.cur() == Some(b':')
            && is_blankz(self.peek(1));
        let text = if multiline {
            None
        } else {
            String::from_utf8(text).ok()
        };
        (text, is_key)
    }

    /// A node in flow context.
    fn flow_node(&mut self) -> Scanned<Node> {
        let pos = self.pos();
        self.properties(true);
        match self.cur() {
            Some(b'[') => self.flow_seq(pos),
            Some(b'{') => self.flow_map(pos),
            Some(b'*') => {
                self.skip_name(true);
                Ok(Node::Other { pos })
            }
            Some(b'"' | b'\'') => Ok(Node::Scalar {
                pos,
                text: self.quoted()?,
            }),
            None | Some(b',' | b']' | b'}') => Err(Unsupported),
            Some(b'?' | b':') if is_blankz(self.peek(1)) => Err(Unsupported),
            Some(_) => Ok(Node::Scalar {
                pos,
                text: self.plain(true, -1).0,
            }),
        }
    }

    fn flow_seq(&mut self, pos: Pos) -> Scanned<Node> {
        self.bump(); // '['
        let mut items = Vec::new();
        loop {
            self.skip_space();
            if self.cur() == Some(b']') {
                self.bump();
                break;
            }
            let item = self.flow_node()?;
            self.skip_space();
            // `[a: b]` is a sequence of single-pair mappings; not followed.
            if self.cur() == Some(b':') {
                return Err(Unsupported);
            }
            items.push(item);
            match self.cur() {
                Some(b',') => self.bump(),
                Some(b']') => {}
                _ => return Err(Unsupported),
            }
        }
        Ok(Node::Seq { pos, items })
    }

    fn flow_map(&mut self, pos: Pos) -> Scanned<Node> {
        self.bump(); // '{'
        let mut entries = Vec::new();
        loop {
            self.skip_space();
            match self.cur() {
                Some(b'}') => {
                    self.bump();
                    break;
                }
                None | Some(b'[' | b'{' | b'*' | b'&' | b'!' | b',') => return Err(Unsupported),
                Some(b'?') if is_blankz(self.peek(1)) => return Err(Unsupported),
                _ => {}
            }
            let key_pos = self.pos();
            let key = if matches!(self.cur(), Some(b'"' | b'\'')) {
                self.quoted()?
            } else {
                self.plain(true, -1).0
            };
            self.skip_space();
            let value = if self.cur() == Some(b':') {
                self.bump();
                self.skip_space();
                if matches!(self.cur(), Some(b',' | b'}')) {
                    Node::Empty { pos: self.pos() }
                } else {
                    self.flow_node()?
                }
            } else {
                Node::Empty { pos: key_pos }
            };
            entries.push(Entry {
                key_pos,
                key,
                value,
            });
            self.skip_space();
            match self.cur() {
                Some(b',') => self.bump(),
                Some(b'}') => {}
                _ => return Err(Unsupported),
            }
        }
        Ok(Node::Map { pos, entries })
    }
}
