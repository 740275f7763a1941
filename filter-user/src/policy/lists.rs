//! List files: big prefix lists kept outside the YAML document, one entry a line, the way
//! provisioning systems export them (and ipset, nft sets and DROP lists are kept).
//!
//! ```text
//! # exported from the CRM, 2026-12-04
//! 100.64.0.0/26
//! 2001:db8:1::/56   # customer 4711
//! ```
//!
//! A line holds a prefix, optionally followed by a `# comment`; blank lines and comment
//! lines are skipped. The file is read line by line, never whole: a million-line file
//! costs one line of buffer here, and the caller decides what to keep of each entry.

use std::{
    fs::File,
    io::{self, BufRead as _, BufReader, Read as _},
    path::Path,
};

/// Largest list file accepted, in bytes: ten times what the dataplane can hold written
/// one IPv6 prefix with a short comment a line. Beyond it, the file is not a prefix list.
pub const MAX_LIST_FILE_BYTES: u64 = 256 * 1024 * 1024;

/// One entry of a list file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct ListLine<'a> {
    /// 1-based line.
    pub line: u32,
    /// 1-based column of the prefix, in characters.
    pub column: u32,
    /// The prefix as written.
    pub prefix: &'a str,
    /// Text after the prefix that is neither blank nor a comment: an error.
    pub trailing: Option<(u32, &'a str)>,
}

/// Why a list file could not be read as a whole (a line's content is the caller's to
/// judge).
#[derive(Debug)]
pub(super) enum ListError {
    Io(io::Error),
    TooLarge(u64),
    /// Not UTF-8 on this line.
    NotText(u32),
}

impl std::fmt::Display for ListError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Io(e) => write!(f, "{e}"),
            Self::TooLarge(len) => write!(
                f,
                "the file is {len} bytes long; a list file may have at most \
                 {MAX_LIST_FILE_BYTES} bytes"
            ),
            Self::NotText(line) => write!(f, "line {line} is not UTF-8 text"),
        }
    }
}

/// Calls `each` for every entry of the list file at `path`, in file order.
pub(super) fn read(path: &Path, mut each: impl FnMut(ListLine<'_>)) -> Result<(), ListError> {
    let file = File::open(path).map_err(ListError::Io)?;
    let len = file.metadata().map_err(ListError::Io)?.len();
    if len > MAX_LIST_FILE_BYTES {
        return Err(ListError::TooLarge(len));
    }
    // `take` bounds the read even if the file grows while it is read.
    let mut reader = BufReader::with_capacity(64 * 1024, file.take(MAX_LIST_FILE_BYTES + 1));
    let mut buf = Vec::with_capacity(256);
    let mut read = 0_u64;
    for number in 1..=u32::MAX {
        buf.clear();
        let n = reader.read_until(b'\n', &mut buf).map_err(ListError::Io)?;
        if n == 0 {
            return Ok(());
        }
        read += n as u64;
        if read > MAX_LIST_FILE_BYTES {
            return Err(ListError::TooLarge(read));
        }
        let text = std::str::from_utf8(&buf).map_err(|_| ListError::NotText(number))?;
        let text = if number == 1 {
            text.strip_prefix('\u{feff}').unwrap_or(text)
        } else {
            text
        };
        if let Some(entry) = parse_line(number, text) {
            each(entry);
        }
    }
    Ok(())
}

/// The entry on one line, or `None` for a blank or comment line.
pub(super) fn parse_line(number: u32, text: &str) -> Option<ListLine<'_>> {
    let text = text.trim_end_matches(['\n', '\r']);
    if text.is_ascii() {
        return parse_ascii_line(number, text);
    }
    let start = text.find(|c: char| !c.is_whitespace())?;
    let rest = text.get(start..)?;
    if rest.starts_with('#') {
        return None;
    }
    let end = rest
        .find(|c: char| c.is_whitespace() || c == '#')
        .unwrap_or(rest.len());
    let (prefix, after) = rest.split_at(end);
    let column = |byte: usize| {
        let chars = text.get(..byte).map_or(0, |s| s.chars().count());
        u32::try_from(chars + 1).unwrap_or(u32::MAX)
    };
    let after_start = after.find(|c: char| !c.is_whitespace());
    let trailing = after_start.and_then(|at| {
        let tail = after.get(at..)?;
        (!tail.starts_with('#')).then(|| (column(start + end + at), tail.trim_end()))
    });
    Some(ListLine {
        line: number,
        column: column(start),
        prefix,
        trailing,
    })
}

/// [`parse_line`] for an ASCII line (nearly all of them): bytes are characters, so no
/// decoding and no counting for the columns.
fn parse_ascii_line(number: u32, text: &str) -> Option<ListLine<'_>> {
    let bytes = text.as_bytes();
    let space = |b: &u8| b.is_ascii_whitespace() || *b == 0x0b;
    let start = bytes.iter().position(|b| !space(b))?;
    if bytes.get(start) == Some(&b'#') {
        return None;
    }
    let rest = bytes.get(start..)?;
    let end = start
        + rest
            .iter()
            .position(|b| space(b) || *b == b'#')
            .unwrap_or(rest.len());
    let column = |at: usize| u32::try_from(at + 1).unwrap_or(u32::MAX);
    let trailing = bytes
        .get(end..)?
        .iter()
        .position(|b| !space(b))
        .map(|at| end + at)
        .filter(|&at| bytes.get(at) != Some(&b'#'))
        .and_then(|at| Some((column(at), text.get(at..)?.trim_end())));
    Some(ListLine {
        line: number,
        column: column(start),
        prefix: text.get(start..end)?,
        trailing,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_hold_a_prefix_and_maybe_a_comment() {
        assert_eq!(parse_line(1, "\n"), None);
        assert_eq!(parse_line(1, "   # only a comment\r\n"), None);
        let got = parse_line(3, "  100.64.0.0/26   # customer 4711\n");
        assert_eq!(
            got,
            Some(ListLine {
                line: 3,
                column: 3,
                prefix: "100.64.0.0/26",
                trailing: None
            })
        );
        let got = parse_line(4, "2001:db8::/32#x");
        assert_eq!(
            got.map(|l| (l.prefix, l.trailing)),
            Some(("2001:db8::/32", None))
        );
        let got = parse_line(5, "é 10.0.0.0/8 10.0.1.0/24\n");
        assert_eq!(
            got.map(|l| (l.column, l.prefix, l.trailing)),
            Some((1, "é", Some((3, "10.0.0.0/8 10.0.1.0/24"))))
        );
    }
}
