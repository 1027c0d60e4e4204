//! Enough of the Redis serialization protocol (RESP2) for redis-cli and
//! redis-benchmark: requests as arrays of bulk strings, or inline commands;
//! replies as simple strings, errors, integers and bulk strings.
//!
//! Every length is bounded before anything is allocated for it, so a hostile
//! or broken client gets an error, never an unbounded allocation.

/// The longest bulk string accepted: 16 MiB. (Redis's own limit is 512 MB;
/// this demo stores small values.)
pub const MAX_BULK: usize = 16 << 20;
/// The most arguments in one command.
pub const MAX_ARGS: usize = 1024;
/// The longest inline command or header line.
pub const MAX_LINE: usize = 64 << 10;
/// The most bytes a connection may hold of a command not yet whole: 64 MiB,
/// four of the longest bulk strings. Each argument is bounded above, but
/// 1024 of them are not (16 GiB); past this the client gets an error and
/// is closed, as Redis does past its `client-query-buffer-limit`.
pub const MAX_QUERY: usize = 64 << 20;

/// The outcome of parsing the front of a buffer.
#[derive(Debug, PartialEq, Eq)]
pub enum Parsed {
    /// Not a whole command yet: read more.
    Incomplete,
    /// A command's arguments and the bytes it took.
    Command(Vec<Vec<u8>>, usize),
    /// A protocol error: reply with it and close the connection.
    Error(&'static str),
}

/// Finds `\r\n` at or after `from`, within `MAX_LINE`.
fn line_end(buf: &[u8], from: usize) -> Result<Option<usize>, &'static str> {
    let window = &buf[from..buf.len().min(from + MAX_LINE + 2)];
    match window.windows(2).position(|w| w == b"\r\n") {
        Some(i) => Ok(Some(from + i)),
        None if window.len() > MAX_LINE => Err("ERR Protocol error: too big inline request"),
        None => Ok(None),
    }
}

fn number(bytes: &[u8]) -> Option<i64> {
    std::str::from_utf8(bytes).ok()?.parse().ok()
}

/// Parses one command from the front of `buf`.
pub fn parse(buf: &[u8]) -> Parsed {
    if buf.is_empty() {
        return Parsed::Incomplete;
    }
    if buf[0] != b'*' {
        return parse_inline(buf);
    }
    let mut at = match line_end(buf, 1) {
        Ok(Some(end)) => end,
        Ok(None) => return Parsed::Incomplete,
        Err(e) => return Parsed::Error(e),
    };
    let count = match number(&buf[1..at]) {
        Some(n) if (1..=MAX_ARGS as i64).contains(&n) => n as usize,
        Some(n) if n <= 0 => return Parsed::Command(Vec::new(), at + 2),
        _ => return Parsed::Error("ERR Protocol error: invalid multibulk length"),
    };
    at += 2;
    // Where each argument lies; copied out only once the whole command is
    // here, so a command arriving in many reads is not copied again on each.
    let mut spans = Vec::with_capacity(count);
    for _ in 0..count {
        if at >= buf.len() {
            return Parsed::Incomplete;
        }
        if buf[at] != b'$' {
            return Parsed::Error("ERR Protocol error: expected '$'");
        }
        let end = match line_end(buf, at + 1) {
            Ok(Some(end)) => end,
            Ok(None) => return Parsed::Incomplete,
            Err(e) => return Parsed::Error(e),
        };
        let len = match number(&buf[at + 1..end]) {
            Some(n) if (0..=MAX_BULK as i64).contains(&n) => n as usize,
            _ => return Parsed::Error("ERR Protocol error: invalid bulk length"),
        };
        let start = end + 2;
        if buf.len() < start + len + 2 {
            return Parsed::Incomplete;
        }
        if &buf[start + len..start + len + 2] != b"\r\n" {
            return Parsed::Error("ERR Protocol error: bulk string not terminated");
        }
        spans.push(start..start + len);
        at = start + len + 2;
    }
    let args = spans.into_iter().map(|span| buf[span].to_vec()).collect();
    Parsed::Command(args, at)
}

fn parse_inline(buf: &[u8]) -> Parsed {
    let end = match buf.iter().position(|&b| b == b'\n') {
        Some(i) if i <= MAX_LINE => i,
        Some(_) => return Parsed::Error("ERR Protocol error: too big inline request"),
        None if buf.len() > MAX_LINE => {
            return Parsed::Error("ERR Protocol error: too big inline request")
        }
        None => return Parsed::Incomplete,
    };
    let line = buf[..end].strip_suffix(b"\r").unwrap_or(&buf[..end]);
    let args = line
        .split(|b| b.is_ascii_whitespace())
        .filter(|a| !a.is_empty())
        .map(<[u8]>::to_vec)
        .collect();
    Parsed::Command(args, end + 1)
}

/// Appends a simple-string reply.
pub fn simple(out: &mut Vec<u8>, s: &str) {
    out.push(b'+');
    out.extend_from_slice(s.as_bytes());
    out.extend_from_slice(b"\r\n");
}

/// Appends an error reply; `e` starts with the error code, such as `ERR`.
pub fn error(out: &mut Vec<u8>, e: &str) {
    out.push(b'-');
    out.extend_from_slice(e.as_bytes());
    out.extend_from_slice(b"\r\n");
}

/// Appends an integer reply.
pub fn integer(out: &mut Vec<u8>, n: i64) {
    out.extend_from_slice(format!(":{n}\r\n").as_bytes());
}

/// Appends a bulk-string reply, or the null bulk string for `None`.
pub fn bulk(out: &mut Vec<u8>, b: Option<&[u8]>) {
    match b {
        Some(b) => {
            out.extend_from_slice(format!("${}\r\n", b.len()).as_bytes());
            out.extend_from_slice(b);
            out.extend_from_slice(b"\r\n");
        }
        None => out.extend_from_slice(b"$-1\r\n"),
    }
}

/// Appends an array reply of bulk strings.
pub fn array(out: &mut Vec<u8>, items: &[&[u8]]) {
    out.extend_from_slice(format!("*{}\r\n", items.len()).as_bytes());
    for i in items {
        bulk(out, Some(i));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cmd(parts: &[&str]) -> Vec<u8> {
        let mut v = format!("*{}\r\n", parts.len()).into_bytes();
        for p in parts {
            v.extend_from_slice(format!("${}\r\n{p}\r\n", p.len()).as_bytes());
        }
        v
    }

    #[test]
    fn whole_and_partial_commands() {
        let c = cmd(&["SET", "k", "value"]);
        assert_eq!(
            parse(&c),
            Parsed::Command(
                vec![b"SET".to_vec(), b"k".to_vec(), b"value".to_vec()],
                c.len()
            )
        );
        for cut in 0..c.len() {
            assert_eq!(parse(&c[..cut]), Parsed::Incomplete, "cut at {cut}");
        }
    }

    #[test]
    fn inline_commands() {
        assert_eq!(
            parse(b"PING\r\nrest"),
            Parsed::Command(vec![b"PING".to_vec()], 6)
        );
        assert_eq!(parse(b"PIN"), Parsed::Incomplete);
    }

    #[test]
    fn hostile_lengths_are_errors_not_allocations() {
        assert!(matches!(parse(b"*99999999999\r\n"), Parsed::Error(_)));
        assert!(matches!(
            parse(b"*1\r\n$999999999999\r\n"),
            Parsed::Error(_)
        ));
        assert!(matches!(parse(b"*1\r\n$-5\r\n"), Parsed::Error(_)));
        assert!(matches!(parse(b"*1\r\n$3\r\nabcXY"), Parsed::Error(_)));
        assert!(matches!(parse(b"*1\r\n:3\r\n"), Parsed::Error(_)));
        assert!(matches!(parse(b"*abc\r\n"), Parsed::Error(_)));
        let long = vec![b'a'; MAX_LINE + 10];
        assert!(matches!(parse(&long), Parsed::Error(_)));
    }
}
