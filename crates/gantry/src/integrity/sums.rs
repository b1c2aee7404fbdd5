//! `SHA256SUMS` read the way GNU `sha256sum -c` reads it, so that a file `sha256sum` checks is
//! checked here against the same digest, and a file it would reject is rejected here too.
//!
//! Both line formats: `<64 hex>  <name>` (text mode) or `<64 hex> *<name>` (binary mode) as
//! `sha256sum` writes, `SHA256 (<name>) = <64 hex>` as `sha256sum --tag` (BSD) writes, and the
//! reversed BSD form `<64 hex> <name>` (`sha256 -r`), not mixed with the text form in one file
//! (GNU refuses that mix so that a name with a leading space cannot be slipped in). Leading
//! white space before a line is skipped, lines starting with `#` and empty lines are ignored,
//! one `\r` before the line's end is dropped, and a UTF-8 byte-order mark at the very start is
//! skipped. A name holding a newline, carriage return or backslash is written escaped, the line
//! starting with `\` and the name using `\n`, `\r`, `\\`; such lines are unescaped. Everything
//! after the type indicator is the name (spaces included), matched byte for byte with a
//! leading `./` dropped.
//!
//! Where GNU only warns, this is strict, because a line skipped is a file loaded unchecked: a
//! line that is none of the above is an error naming its number, and so is a name listed
//! twice (GNU checks both lines, so two entries for one file are two claims about it).

use std::collections::HashMap;

use super::{from_hex, Digest};

/// The digests a `SHA256SUMS` lists, by file name.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Sums {
    /// Name (bytes, unescaped, without a leading `./`) to digest and the line it was on.
    entries: HashMap<Vec<u8>, (Digest, usize)>,
}

impl Sums {
    /// The digest listed for file `name` (a base name, or a path relative to the list's
    /// directory; a leading `./` is ignored).
    pub fn get(&self, name: &[u8]) -> Option<Digest> {
        self.entries.get(normal(name)).map(|(d, _)| *d)
    }

    /// Names listed.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.entries.len()
    }
}

fn normal(name: &[u8]) -> &[u8] {
    name.strip_prefix(b"./").unwrap_or(name)
}

const SHAPES: &str = "expected '<64 hex digits>  <name>', '<64 hex digits> *<name>' or \
                      'SHA256 (<name>) = <64 hex digits>'";

/// Parses a whole `SHA256SUMS`; the error names the line (counted from 1) and what is wrong.
pub fn parse(text: &[u8]) -> Result<Sums, String> {
    let text = text.strip_prefix(b"\xef\xbb\xbf").unwrap_or(text);
    let mut sums = Sums::default();
    // GNU's `bsd_reversed`: unknown until the first line in either form decides it.
    let mut reversed = None;
    let mut lines = text.split(|&b| b == b'\n').enumerate().peekable();
    while let Some((i, line)) = lines.next() {
        let number = i + 1;
        if lines.peek().is_none() && line.is_empty() {
            break; // after the last newline
        }
        if line.first() == Some(&b'#') {
            continue;
        }
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.is_empty() {
            continue;
        }
        let (name, digest) =
            split_line(line, &mut reversed).map_err(|what| format!("line {number}: {what}"))?;
        if let Some((_, first)) = sums.entries.get(normal(&name)) {
            return Err(format!(
                "line {number}: '{}' is listed again (first on line {first}); a file has one digest",
                String::from_utf8_lossy(&name).escape_debug()
            ));
        }
        sums.entries.insert(normal(&name).to_vec(), (digest, number));
    }
    Ok(sums)
}

/// C's `isspace`.
fn is_space(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\n' | 0x0b | 0x0c | b'\r')
}

/// One line (no newline): its name and digest, as GNU's `split_3`.
fn split_line(line: &[u8], reversed: &mut Option<bool>) -> Result<(Vec<u8>, Digest), String> {
    let mut s = line;
    while s.first().is_some_and(|&b| is_space(b)) {
        s = &s[1..];
    }
    let escaped = s.first() == Some(&b'\\');
    if escaped {
        s = &s[1..];
    }
    if let Some(rest) = s.strip_prefix(b"SHA256") {
        let rest = rest.strip_prefix(b" ").unwrap_or(rest);
        return match rest.strip_prefix(b"(") {
            Some(rest) => tagged(rest, escaped),
            None => Err(SHAPES.to_owned()),
        };
    }
    if s.len() < 64 + 1 || !is_space(s[64]) {
        return Err(SHAPES.to_owned());
    }
    let digest = hex(&s[..64])?;
    let mut name = &s[65..];
    if name.len() == 1 || !matches!(name.first(), Some(b' ' | b'*')) {
        if *reversed == Some(false) {
            return Err(format!("{SHAPES} (a line of one space mixed with lines of two)"));
        }
        *reversed = Some(true);
    } else if *reversed != Some(true) {
        *reversed = Some(false);
        name = &name[1..];
    }
    Ok((file_name(name, escaped)?, digest))
}

/// The rest of a `SHA256 (<name>) = <digest>` line after the `(`, as GNU's `bsd_split_3`.
fn tagged(s: &[u8], escaped: bool) -> Result<(Vec<u8>, Digest), String> {
    let close = s.iter().rposition(|&b| b == b')').ok_or_else(|| SHAPES.to_owned())?;
    let name = file_name(&s[..close], escaped)?;
    let white = |b: &u8| *b == b' ' || *b == b'\t';
    let rest = &s[close + 1..];
    let rest = &rest[rest.iter().take_while(|b| white(b)).count()..];
    let rest = rest.strip_prefix(b"=").ok_or_else(|| SHAPES.to_owned())?;
    let rest = &rest[rest.iter().take_while(|b| white(b)).count()..];
    Ok((name, hex(rest)?))
}

fn hex(text: &[u8]) -> Result<Digest, String> {
    std::str::from_utf8(text).ok().and_then(from_hex).ok_or_else(|| {
        format!("'{}' is not a SHA-256 digest (64 hex digits)", String::from_utf8_lossy(text))
    })
}

/// A listed name, unescaped when its line started with `\`.
fn file_name(name: &[u8], escaped: bool) -> Result<Vec<u8>, String> {
    if name.is_empty() {
        return Err("no file name".to_owned());
    }
    if name.contains(&0) {
        return Err("a NUL byte in the file name".to_owned());
    }
    if !escaped {
        return Ok(name.to_vec());
    }
    let mut out = Vec::with_capacity(name.len());
    let mut bytes = name.iter();
    while let Some(&b) = bytes.next() {
        if b != b'\\' {
            out.push(b);
            continue;
        }
        out.push(match bytes.next() {
            Some(b'\\') => b'\\',
            Some(b'n') => b'\n',
            Some(b'r') => b'\r',
            _ => return Err("a backslash in an escaped name not followed by \\, n or r".into()),
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests;
