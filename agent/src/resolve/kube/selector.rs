//! SERVICE_SELECTOR: a Kubernetes label selector, checked at start.
//!
//! A key's prefix is a DNS subdomain, checked with the shared name rules
//! ([`itw_proto::names::subdomain`]). The key's name and the values are
//! another grammar (qualified names: upper case, `_` and `.` allowed), which
//! no object name follows, so it stays here.
//!
//! The apiserver would refuse a malformed selector on every list, and the
//! watcher would retry forever with the agent never ready; checking it here
//! turns that into one clear error at start.

use std::collections::BTreeSet;

use kube::core::{Expression, Selector};

/// Parses a label selector in the apiserver's syntax: comma-separated
/// `key`, `!key`, `key=value`, `key==value`, `key!=value`,
/// `key in (a,b)`, `key notin (a,b)`.
pub fn parse(text: &str) -> Result<Selector, String> {
    if text.trim().is_empty() {
        return Err("empty selector; leave SERVICE_SELECTOR unset to select every Service".into());
    }
    let mut expressions = Vec::new();
    for requirement in split_requirements(text)? {
        let requirement = requirement.trim();
        if requirement.is_empty() {
            return Err("empty requirement (a stray comma?)".into());
        }
        expressions.push(parse_requirement(requirement)?);
    }
    Ok(expressions.into_iter().collect())
}

/// Splits on the commas outside parentheses.
fn split_requirements(text: &str) -> Result<Vec<&str>, String> {
    let mut parts = Vec::new();
    let mut depth = 0usize;
    let mut start = 0;
    for (i, c) in text.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => {
                depth = depth
                    .checked_sub(1)
                    .ok_or_else(|| format!("unbalanced ')' at offset {i}"))?;
            }
            ',' if depth == 0 => {
                parts.push(&text[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    if depth != 0 {
        return Err("unbalanced '('".into());
    }
    parts.push(&text[start..]);
    Ok(parts)
}

fn parse_requirement(req: &str) -> Result<Expression, String> {
    if let Some(key) = req.strip_prefix('!') {
        let key = key.trim();
        check_key(key)?;
        return Ok(Expression::DoesNotExist(key.into()));
    }
    if let Some((key, value)) = req.split_once("!=") {
        let (key, value) = (key.trim(), value.trim());
        check_key(key)?;
        check_value(value)?;
        return Ok(Expression::NotEqual(key.into(), value.into()));
    }
    if let Some((key, value)) = req.split_once("==").or_else(|| req.split_once('=')) {
        let (key, value) = (key.trim(), value.trim());
        check_key(key)?;
        check_value(value)?;
        return Ok(Expression::Equal(key.into(), value.into()));
    }
    let mut words = req.splitn(2, char::is_whitespace);
    let key = words.next().unwrap_or_default().trim();
    let rest = words.next().unwrap_or_default().trim();
    if rest.is_empty() {
        check_key(key)?;
        return Ok(Expression::Exists(key.into()));
    }
    check_key(key)?;
    let (negated, set) = if let Some(set) = rest.strip_prefix("notin") {
        (true, set)
    } else if let Some(set) = rest.strip_prefix("in") {
        (false, set)
    } else {
        return Err(format!(
            "{req:?}: expected `in (...)` or `notin (...)` after the key"
        ));
    };
    let values = set
        .trim()
        .strip_prefix('(')
        .and_then(|s| s.strip_suffix(')'))
        .ok_or_else(|| format!("{req:?}: the values must be in parentheses"))?;
    let mut set = BTreeSet::new();
    for value in values.split(',') {
        let value = value.trim();
        check_value(value)?;
        set.insert(value.to_owned());
    }
    Ok(if negated {
        Expression::NotIn(key.into(), set)
    } else {
        Expression::In(key.into(), set)
    })
}

/// A label key: `[prefix/]name`, the prefix a DNS subdomain.
fn check_key(key: &str) -> Result<(), String> {
    let (prefix, name) = match key.split_once('/') {
        Some((prefix, name)) => (Some(prefix), name),
        None => (None, key),
    };
    if let Some(prefix) = prefix
        && itw_proto::names::subdomain(prefix).is_err()
    {
        return Err(format!(
            "{key:?}: the key prefix must be a DNS subdomain (lowercase letters, digits, '-', '.')"
        ));
    }
    if name.is_empty() || !is_label_word(name) {
        return Err(format!(
            "{key:?} is not a label key (at most 63 letters, digits, '-', '_', '.', starting and ending with a letter or digit)"
        ));
    }
    Ok(())
}

fn check_value(value: &str) -> Result<(), String> {
    if value.is_empty() || is_label_word(value) {
        Ok(())
    } else {
        Err(format!(
            "{value:?} is not a label value (at most 63 letters, digits, '-', '_', '.', starting and ending with a letter or digit)"
        ))
    }
}

fn is_label_word(s: &str) -> bool {
    let alnum = |c: Option<char>| c.is_some_and(|c| c.is_ascii_alphanumeric());
    s.len() <= 63
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        && alnum(s.chars().next())
        && alnum(s.chars().last())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_form_to_the_apiserver_syntax() {
        let cases = [
            ("app=web", "app=web"),
            ("app == web", "app=web"),
            ("tier!=cache", "tier!=cache"),
            ("scale-to-zero", "scale-to-zero"),
            ("!legacy", "!legacy"),
            ("env in (prod, staging)", "env in (prod,staging)"),
            ("env notin (dev)", "env notin (dev)"),
            (
                "example.com/owner=team-a,app.kubernetes.io/part-of in (shop)",
                "example.com/owner=team-a,app.kubernetes.io/part-of in (shop)",
            ),
            ("app=", "app="),
        ];
        for (given, expected) in cases {
            let selector = parse(given).unwrap_or_else(|e| panic!("{given}: {e}"));
            assert_eq!(selector.to_string(), expected, "{given}");
        }
    }

    #[test]
    fn rejects_malformed_selectors_saying_why() {
        let cases = [
            ("", "empty selector"),
            ("app=web,", "empty requirement"),
            ("app=we b", "not a label value"),
            ("Bad Key=1", "\"Bad Key\""),
            ("env in prod", "parentheses"),
            ("env within (a)", "`in (...)`"),
            ("env in (a", "unbalanced"),
            ("UPPER.example/x=1", "DNS subdomain"),
            ("-app=1", "not a label key"),
        ];
        for (given, needle) in cases {
            let err = parse(given).expect_err(given);
            assert!(err.contains(needle), "{given:?}: {err}");
        }
    }
}
