//! Client input echoed in error messages, bounded: a 1 MiB id must not become a 1 MiB gRPC status
//! (grpc-core clients fail such a call with RESOURCE_EXHAUSTED instead of showing the error), and a NUL
//! byte must not reach a status message.

use std::fmt;

/// Characters of a client value quoted in a message.
pub const MAX_ECHO: usize = 96;
/// Bytes of a status message sent to a client.
pub const MAX_MESSAGE: usize = 4096;

/// A client value for an error message: Debug-quoted (control characters escaped), cut after
/// [`MAX_ECHO`] characters with the full length noted.
pub struct Echo<'a>(pub &'a str);

/// Shorthand for [`Echo`].
pub fn echo(value: &str) -> Echo<'_> {
    Echo(value)
}

impl fmt::Display for Echo<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let v = self.0;
        match v.char_indices().nth(MAX_ECHO) {
            None => write!(f, "{v:?}"),
            Some((cut, _)) => write!(f, "{:?}... ({} bytes)", &v[..cut], v.len()),
        }
    }
}

/// `message` fit for a gRPC status: NUL and other control characters (but newlines and tabs)
/// escaped, at most [`MAX_MESSAGE`] bytes (cut on a character boundary, marked).
pub fn bounded(message: &str) -> String {
    let mut out = String::with_capacity(message.len().min(MAX_MESSAGE));
    for c in message.chars() {
        if c.is_control() && c != '\n' && c != '\t' {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
        if out.len() > MAX_MESSAGE {
            let mut cut = MAX_MESSAGE - 20;
            while !out.is_char_boundary(cut) {
                cut -= 1;
            }
            out.truncate(cut);
            out.push_str("... (truncated)");
            break;
        }
    }
    out
}

/// A status with its message [`bounded`].
pub fn bounded_status(status: tonic::Status) -> tonic::Status {
    let message = status.message();
    let clean = message.len() <= MAX_MESSAGE
        && !message
            .chars()
            .any(|c| c.is_control() && c != '\n' && c != '\t');
    if clean {
        status
    } else {
        tonic::Status::new(status.code(), bounded(message))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn echoes_are_short_and_escaped() {
        assert_eq!(echo("abc").to_string(), "\"abc\"");
        assert_eq!(echo("a\0b").to_string(), "\"a\\0b\"");
        let long = "x".repeat(1 << 20);
        let shown = echo(&long).to_string();
        assert!(shown.len() < 150, "{}", shown.len());
        assert!(shown.ends_with("(1048576 bytes)"), "{shown}");
        // Multi-byte characters are cut on a boundary.
        let wide = "é".repeat(200);
        assert!(echo(&wide).to_string().contains("(400 bytes)"));
    }

    #[test]
    fn messages_are_bounded_and_free_of_nul() {
        let m = bounded(&format!("bad: {}", "y".repeat(10_000)));
        assert!(m.len() <= MAX_MESSAGE, "{}", m.len());
        assert!(m.ends_with("(truncated)"));
        assert_eq!(bounded("a\0b\nc"), "a\\u{0}b\nc");
        let s = bounded_status(tonic::Status::internal("x\0y"));
        assert_eq!(s.code(), tonic::Code::Internal);
        assert!(!s.message().contains('\0'));
        let ok = tonic::Status::not_found("fine");
        assert_eq!(bounded_status(ok).message(), "fine");
    }
}
