//! The bearer token rule, one copy for both ends: the token the agent sends
//! in its `authorization` header and the one the scaler compares it with.
//! A gRPC header carries printable ASCII only, so a token outside that could
//! never be sent, nor ever be matched.

/// Why a token was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TokenProblem {
    /// Nothing but whitespace.
    Empty,
    /// The first character a header cannot carry.
    Unprintable(char),
}

impl TokenProblem {
    /// The problem, phrased the same on both ends, with what it means on the
    /// caller's side: `if_empty` follows an empty token's message,
    /// `unprintable_also` the reason an unprintable one is refused.
    pub fn message(self, if_empty: &str, unprintable_also: &str) -> String {
        match self {
            Self::Empty => format!("the token is empty; {if_empty}"),
            Self::Unprintable(bad) => format!(
                "the token holds {bad:?}: a bearer token is printable ASCII without spaces (a gRPC header cannot carry anything else{unprintable_also})"
            ),
        }
    }
}

/// The token in `s` (surrounding whitespace, such as a file's final newline,
/// trimmed), if a gRPC header can carry it.
pub fn bearer_token(s: &str) -> Result<&str, TokenProblem> {
    let token = s.trim();
    if token.is_empty() {
        return Err(TokenProblem::Empty);
    }
    match token.chars().find(|c| !c.is_ascii_graphic()) {
        Some(bad) => Err(TokenProblem::Unprintable(bad)),
        None => Ok(token),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn printable_ascii_is_a_token_and_whitespace_around_it_is_trimmed() {
        assert_eq!(bearer_token("s3cr3t-Token_~!\n"), Ok("s3cr3t-Token_~!"));
        assert_eq!(bearer_token("  \n"), Err(TokenProblem::Empty));
        assert_eq!(
            bearer_token("two words"),
            Err(TokenProblem::Unprintable(' '))
        );
        assert_eq!(bearer_token("ünï"), Err(TokenProblem::Unprintable('ü')));
        assert_eq!(
            bearer_token("tab\there"),
            Err(TokenProblem::Unprintable('\t'))
        );
    }

    #[test]
    fn messages_carry_each_sides_meaning() {
        assert_eq!(
            TokenProblem::Empty.message("unset it", ", ever"),
            "the token is empty; unset it"
        );
        assert_eq!(
            TokenProblem::Unprintable('ó').message("unset it", ", ever"),
            "the token holds 'ó': a bearer token is printable ASCII without spaces (a gRPC header cannot carry anything else, ever)"
        );
    }
}
