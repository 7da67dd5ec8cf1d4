//! One line for an error and its causes, where an error must become text (a CNI result's
//! details, a status document): every error here keeps its cause in `source()`, out of its
//! message, so printing only the top would lose it.

use std::error::Error;
use std::fmt::Write;

/// `outer: cause: root cause`.
pub fn error_chain(error: &dyn Error) -> String {
    let mut line = error.to_string();
    let mut cause = error.source();
    while let Some(inner) = cause {
        let _ = write!(line, ": {inner}");
        cause = inner.source();
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("add route 10.0.0.0/8")]
    struct Outer(#[source] std::io::Error);

    #[test]
    fn every_cause_is_printed_once() {
        let error = Outer(std::io::Error::other("File exists"));
        assert_eq!(error_chain(&error), "add route 10.0.0.0/8: File exists");
    }
}
