//! Kubernetes name rules for the names that reach the scaler from KEDA and
//! from agents. Valid names also keep metric names free of `/` and `%`.

/// Why a name was refused, phrased to follow "`field` = "value": ".
pub type NameProblem = &'static str;

/// A namespace (RFC 1123 label): lowercase letters, digits and `-`, starting
/// and ending with a letter or digit, 1-63 characters.
pub fn namespace(name: &str) -> Result<(), NameProblem> {
    label(name, false).map_err(|()| {
        "not a Kubernetes namespace name (lowercase letters, digits and '-', starting and ending with a letter or digit, at most 63 characters)"
    })
}

/// A Service name (RFC 1035 label): as a namespace, but starting with a letter.
pub fn service(name: &str) -> Result<(), NameProblem> {
    label(name, true).map_err(|()| {
        "not a Kubernetes Service name (lowercase letters, digits and '-', starting with a letter and ending with a letter or digit, at most 63 characters)"
    })
}

/// A pod name (RFC 1123 subdomain): dot-separated labels, at most 253 characters.
pub fn pod(name: &str) -> Result<(), NameProblem> {
    const PROBLEM: NameProblem = "not a Kubernetes pod name (lowercase letters, digits, '-' and '.', at most 253 characters)";
    if name.is_empty() || name.len() > 253 {
        return Err(PROBLEM);
    }
    name.split('.')
        .try_for_each(|part| label(part, false))
        .map_err(|()| PROBLEM)
}

fn label(name: &str, letter_first: bool) -> Result<(), ()> {
    let bytes = name.as_bytes();
    let (Some(&first), Some(&last)) = (bytes.first(), bytes.last()) else {
        return Err(());
    };
    let lower_alnum = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    let ok = bytes.len() <= 63
        && if letter_first {
            first.is_ascii_lowercase()
        } else {
            lower_alnum(first)
        }
        && lower_alnum(last)
        && bytes.iter().all(|&b| lower_alnum(b) || b == b'-');
    if ok { Ok(()) } else { Err(()) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_kubernetes_names() {
        for ok in ["default", "a", "kube-system", "0ns", "a1-b2"] {
            assert_eq!(namespace(ok), Ok(()), "{ok}");
        }
        for ok in ["web", "a", "my-svc-2"] {
            assert_eq!(service(ok), Ok(()), "{ok}");
        }
        for ok in ["web-7d9f8-abcde", "a.b.c", "0pod"] {
            assert_eq!(pod(ok), Ok(()), "{ok}");
        }
        assert_eq!(namespace(&"a".repeat(63)), Ok(()));
        assert_eq!(
            pod(&[
                "a".repeat(63),
                "b".repeat(63),
                "c".repeat(63),
                "d".repeat(61)
            ]
            .join(".")),
            Ok(())
        );
    }

    #[test]
    fn refuses_what_kubernetes_refuses() {
        for bad in ["", "Default", "-a", "a-", "a_b", "a/b", "a%b", "a.b", "é"] {
            assert!(namespace(bad).is_err(), "{bad:?}");
        }
        assert!(namespace(&"a".repeat(64)).is_err());
        // Services must start with a letter.
        assert!(service("0web").is_err());
        assert!(service("web/x").is_err());
        for bad in ["", "a..b", ".a", "a.", "A", "a/b"] {
            assert!(pod(bad).is_err(), "{bad:?}");
        }
        assert!(pod(&"a".repeat(254)).is_err());
    }
}
