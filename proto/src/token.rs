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

/// Why a presented token was refused; each binary phrases it with the
/// setting its operator would change.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// No `authorization` header.
    Missing,
    /// The header is not `Bearer <token>`.
    NotBearer,
    /// A bearer token, but not the expected one.
    Mismatch,
}

/// A token that must not reach logs (`AGENT_TOKEN`, the relay's `TOKEN`):
/// its Debug form hides it. Parsed by the bearer token rule.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(pub String);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

impl std::str::FromStr for Secret {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        bearer_token(s)
            .map(|token| Self(token.to_owned()))
            .map_err(|problem| {
                problem.message(
                    "unset it to accept agents without a token",
                    ", so no agent could ever match it",
                )
            })
    }
}

/// Where the token clients must present comes from (the scaler's and the
/// relay's settings).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenSource {
    /// No token: clients are not asked for one.
    None,
    Value(Secret),
    /// Read at start and whenever the file changes.
    File(std::path::PathBuf),
}

/// Why a token file gave no token.
#[derive(Debug)]
pub enum FileProblem {
    Read(std::io::Error),
    Token(TokenProblem),
}

impl std::fmt::Display for FileProblem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Read(error) => error.fmt(f),
            Self::Token(problem) => {
                f.write_str(&problem.message("put the token in it", ", so no client could send it"))
            }
        }
    }
}

impl std::error::Error for FileProblem {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::Read(error) => Some(error),
            Self::Token(_) => None,
        }
    }
}

/// The token clients must present, from a value or a file (a mounted
/// Secret) that [`ExpectedToken::reload`] re-reads, so rotating the Secret
/// needs no restart. A file that turns unreadable or empty keeps the last
/// good token rather than locking every client out or letting everyone in.
pub struct ExpectedToken {
    file: Option<std::path::PathBuf>,
    current: parking_lot::RwLock<Option<std::sync::Arc<str>>>,
}

impl ExpectedToken {
    /// No token: every client is let in.
    pub fn none() -> Self {
        Self {
            file: None,
            current: parking_lot::RwLock::new(None),
        }
    }

    /// A token given as a value (already checked with [`bearer_token`]).
    pub fn value(token: &str) -> Self {
        Self {
            file: None,
            current: parking_lot::RwLock::new(Some(token.into())),
        }
    }

    /// The token in `path`, which must exist and hold one now.
    pub fn file(path: &std::path::Path) -> Result<Self, FileProblem> {
        let token = read_token_file(path)?;
        Ok(Self {
            file: Some(path.to_owned()),
            current: parking_lot::RwLock::new(Some(token)),
        })
    }

    /// Whether clients must send a token.
    pub fn required(&self) -> bool {
        self.current.read().is_some()
    }

    /// The file the token comes from, if any.
    pub fn path(&self) -> Option<&std::path::Path> {
        self.file.as_deref()
    }

    /// The token now (to present it further on, as a relay does).
    pub fn current(&self) -> Option<std::sync::Arc<str>> {
        self.current.read().clone()
    }

    /// Checks a request's `authorization: Bearer <token>` header, comparing
    /// in constant time.
    pub fn check(&self, metadata: &tonic::metadata::MetadataMap) -> Result<(), Refusal> {
        use subtle::ConstantTimeEq;
        let Some(expected) = self.current() else {
            return Ok(());
        };
        let header = metadata.get("authorization").ok_or(Refusal::Missing)?;
        let presented = header
            .to_str()
            .ok()
            .and_then(|value| {
                let (scheme, token) = value.split_once(' ')?;
                scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
            })
            .ok_or(Refusal::NotBearer)?;
        if bool::from(presented.as_bytes().ct_eq(expected.as_bytes())) {
            Ok(())
        } else {
            Err(Refusal::Mismatch)
        }
    }

    /// Re-reads the token file: `Ok(true)` when the token changed; an
    /// error keeps the previous token.
    pub fn reload(&self) -> Result<bool, FileProblem> {
        let Some(path) = &self.file else {
            return Ok(false);
        };
        let token = read_token_file(path)?;
        let mut current = self.current.write();
        if current.as_deref() == Some(&*token) {
            return Ok(false);
        }
        *current = Some(token);
        Ok(true)
    }
}

fn read_token_file(path: &std::path::Path) -> Result<std::sync::Arc<str>, FileProblem> {
    let text = std::fs::read_to_string(path).map_err(FileProblem::Read)?;
    bearer_token(&text)
        .map(std::sync::Arc::from)
        .map_err(FileProblem::Token)
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

    fn metadata(value: Option<&str>) -> tonic::metadata::MetadataMap {
        let mut map = tonic::metadata::MetadataMap::new();
        if let Some(v) = value {
            map.insert("authorization", v.parse().unwrap());
        }
        map
    }

    #[test]
    fn an_expected_token_must_be_presented_as_bearer() {
        let none = ExpectedToken::none();
        assert!(!none.required());
        assert_eq!(none.check(&metadata(None)), Ok(()));
        let token = ExpectedToken::value("s3cret");
        assert!(token.required());
        assert_eq!(token.check(&metadata(Some("Bearer s3cret"))), Ok(()));
        assert_eq!(token.check(&metadata(Some("bearer s3cret"))), Ok(()));
        assert_eq!(token.check(&metadata(None)), Err(Refusal::Missing));
        assert_eq!(
            token.check(&metadata(Some("Basic s3cret"))),
            Err(Refusal::NotBearer)
        );
        assert_eq!(
            token.check(&metadata(Some("s3cret"))),
            Err(Refusal::NotBearer)
        );
        assert_eq!(
            token.check(&metadata(Some("Bearer s3cre"))),
            Err(Refusal::Mismatch)
        );
        assert_eq!(
            token.check(&metadata(Some("Bearer s3cretx"))),
            Err(Refusal::Mismatch)
        );
    }

    #[test]
    fn a_token_file_is_reloaded_and_a_bad_one_keeps_the_last() {
        let dir = std::env::temp_dir().join(format!("itw-proto-token-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("token");
        std::fs::write(&path, "first\n").unwrap();
        let token = ExpectedToken::file(&path).unwrap();
        assert_eq!(token.check(&metadata(Some("Bearer first"))), Ok(()));
        assert!(!token.reload().unwrap(), "unchanged file");
        std::fs::write(&path, "second").unwrap();
        assert!(token.reload().unwrap());
        assert_eq!(token.check(&metadata(Some("Bearer second"))), Ok(()));
        assert_eq!(
            token.check(&metadata(Some("Bearer first"))),
            Err(Refusal::Mismatch)
        );
        std::fs::write(&path, "  \n").unwrap();
        assert_eq!(
            token.reload().unwrap_err().to_string(),
            "the token is empty; put the token in it"
        );
        std::fs::remove_file(&path).unwrap();
        assert!(token.reload().is_err());
        assert_eq!(token.check(&metadata(Some("Bearer second"))), Ok(()));
        assert!(matches!(
            ExpectedToken::file(&path),
            Err(FileProblem::Read(_))
        ));
        std::fs::remove_dir_all(&dir).unwrap();
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
