//! Process names as the kernel keeps them: 16 NUL-padded bytes (`Comm`),
//! truncated to 15. Owns the two directions of that conversion and
//! `EXCLUDE_COMMS`, the names whose attempts the programs count apart.
//!
//! A name the kernel would truncate is refused here rather than silently
//! never matching.

use std::str::FromStr;

use itw_common::{COMM_LEN, Comm};

/// Process names to filter, each as the kernel stores it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExcludeComms(pub Vec<String>);

impl ExcludeComms {
    /// The names as kernel map keys.
    pub fn comms(&self) -> Vec<Comm> {
        self.0.iter().map(|name| comm_bytes(name)).collect()
    }
}

impl FromStr for ExcludeComms {
    type Err = String;

    fn from_str(list: &str) -> Result<Self, Self::Err> {
        let mut names = Vec::new();
        for name in list.split(',').map(str::trim).filter(|n| !n.is_empty()) {
            if name.len() >= COMM_LEN {
                return Err(format!(
                    "process name {name:?} is {} bytes; the kernel keeps only the first {} bytes of a process name, so use {:?}",
                    name.len(),
                    COMM_LEN - 1,
                    truncate_utf8(name, COMM_LEN - 1),
                ));
            }
            if name.contains('\0') {
                return Err(format!("process name {name:?} contains a NUL byte"));
            }
            if !names.iter().any(|n| n == name) {
                names.push(name.to_owned());
            }
        }
        Ok(Self(names))
    }
}

/// A name as a NUL-padded kernel comm (the caller checked its length).
pub fn comm_bytes(name: &str) -> Comm {
    let mut comm = [0u8; COMM_LEN];
    let len = name.len().min(COMM_LEN - 1);
    comm[..len].copy_from_slice(&name.as_bytes()[..len]);
    comm
}

/// A kernel comm as text: up to the first NUL, invalid UTF-8 replaced.
pub fn comm_name(comm: &Comm) -> String {
    let end = comm.iter().position(|&b| b == 0).unwrap_or(comm.len());
    String::from_utf8_lossy(&comm[..end]).into_owned()
}

fn truncate_utf8(s: &str, max: usize) -> &str {
    let mut end = max.min(s.len());
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exclude_comms_is_a_trimmed_deduplicated_list() {
        assert_eq!(
            " kubelet,k3s ,,kubelet".parse::<ExcludeComms>().unwrap(),
            ExcludeComms(vec!["kubelet".into(), "k3s".into()])
        );
        assert_eq!("".parse::<ExcludeComms>().unwrap(), ExcludeComms(vec![]));
        assert_eq!(
            ExcludeComms(vec!["kubelet".into()]).comms(),
            vec![*b"kubelet\0\0\0\0\0\0\0\0\0"]
        );
    }

    #[test]
    fn comm_names_stop_at_the_first_nul() {
        assert_eq!(comm_name(b"java\0\0\0\0\0\0\0\0\0\0\0\0"), "java");
        assert_eq!(comm_name(b"fifteen-chars-x\0"), "fifteen-chars-x");
        assert_eq!(comm_name(b"\xffbad\0\0\0\0\0\0\0\0\0\0\0\0"), "\u{fffd}bad");
    }
}
