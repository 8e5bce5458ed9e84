//! Which capture mode to use: what this kernel and host offer, and the
//! choice for `CAPTURE_MODE` (a pure function of the two, so it is tested
//! without a kernel).

use std::path::Path;

use super::{CaptureError, CaptureMode, cgroup::CgroupRoot};

/// The perf event source the loader attaches kprobes through.
pub const KPROBE_PMU: &str = "/sys/bus/event_source/devices/kprobe/type";
/// The perf event source tracepoints are attached through.
pub const TRACEPOINT_PMU: &str = "/sys/bus/event_source/devices/tracepoint";

/// What the host offers for each mode.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Features {
    /// The cgroup v2 root, or why there is none.
    pub cgroup: Result<CgroupRoot, String>,
    /// `CGROUP_ROOT` was set: a bad value is an error even in auto mode,
    /// rather than a silent fallback to another mode.
    pub cgroup_root_set: bool,
    /// The kernel has kprobe events.
    pub kprobes: bool,
    /// The kernel has perf tracepoint events.
    pub tracepoints: bool,
}

/// Looks at the host.
pub fn detect(cgroup_root: Option<&Path>) -> Features {
    Features {
        cgroup: super::cgroup::find_root(cgroup_root),
        cgroup_root_set: cgroup_root.is_some(),
        kprobes: Path::new(KPROBE_PMU).exists(),
        tracepoints: Path::new(TRACEPOINT_PMU).exists(),
    }
}

/// A mode this host can do, with what detection found for it: never
/// [`CaptureMode::Auto`], and never the cgroup mode without a root.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Chosen {
    Cgroup(CgroupRoot),
    Kprobe,
    Tracepoint,
}

impl Chosen {
    pub fn mode(&self) -> CaptureMode {
        match self {
            Self::Cgroup(_) => CaptureMode::Cgroup,
            Self::Kprobe => CaptureMode::Kprobe,
            Self::Tracepoint => CaptureMode::Tracepoint,
        }
    }
}

/// A chosen mode and why, for the start log and /metrics.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Choice {
    pub chosen: Chosen,
    pub reason: String,
}

impl Choice {
    pub fn mode(&self) -> CaptureMode {
        self.chosen.mode()
    }

    /// The cgroup root, for the cgroup mode.
    pub fn cgroup(&self) -> Option<&CgroupRoot> {
        match &self.chosen {
            Chosen::Cgroup(root) => Some(root),
            Chosen::Kprobe | Chosen::Tracepoint => None,
        }
    }
}

impl Features {
    fn missing(&self, mode: CaptureMode) -> Option<String> {
        match mode {
            CaptureMode::Auto => None,
            CaptureMode::Cgroup => self.cgroup.as_ref().err().cloned(),
            CaptureMode::Kprobe => (!self.kprobes).then(|| {
                format!("this kernel has no kprobe events (CONFIG_KPROBE_EVENTS; {KPROBE_PMU} is missing)")
            }),
            CaptureMode::Tracepoint => (!self.tracepoints).then(|| {
                format!("this kernel has no tracepoint events (CONFIG_TRACEPOINTS with CONFIG_PERF_EVENTS; {TRACEPOINT_PMU} is missing)")
            }),
        }
    }

    /// The modes that would work, in auto's order of preference.
    pub fn available(&self) -> Vec<CaptureMode> {
        [
            CaptureMode::Cgroup,
            CaptureMode::Kprobe,
            CaptureMode::Tracepoint,
        ]
        .into_iter()
        .filter(|m| self.missing(*m).is_none())
        .collect()
    }
}

/// The mode for `requested`. Auto prefers cgroup (it sees the address the
/// caller asked for, before a socket-level load balancer rewrites or refuses
/// it), then kprobe, then tracepoint. A forced mode the host lacks is an
/// error that says what is missing and what to use instead.
pub fn choose(requested: CaptureMode, features: &Features) -> Result<Choice, CaptureError> {
    let forced = match requested {
        CaptureMode::Auto => return choose_auto(features),
        CaptureMode::Cgroup => features.cgroup.clone().map(Chosen::Cgroup),
        CaptureMode::Kprobe => features.missing(requested).map_or(Ok(Chosen::Kprobe), Err),
        CaptureMode::Tracepoint => features
            .missing(requested)
            .map_or(Ok(Chosen::Tracepoint), Err),
    };
    match forced {
        Ok(chosen) => Ok(Choice {
            chosen,
            reason: format!("CAPTURE_MODE={requested}"),
        }),
        Err(missing) => {
            let others: Vec<_> = features
                .available()
                .into_iter()
                .map(CaptureMode::as_str)
                .collect();
            let instead = if others.is_empty() {
                "and no other capture mode is available on this host either".to_owned()
            } else {
                format!("use {}", others.join(" or "))
            };
            Err(CaptureError::ModeUnavailable {
                mode: requested,
                missing,
                instead,
            })
        }
    }
}

fn choose_auto(features: &Features) -> Result<Choice, CaptureError> {
    match &features.cgroup {
        Ok(root) => {
            let subtree = match &root.subtree {
                Some(tree) => format!(
                    "; it shows only the sub-tree {tree}, so connects from outside it are not seen"
                ),
                None => String::new(),
            };
            return Ok(Choice {
                chosen: Chosen::Cgroup(root.clone()),
                reason: format!(
                    "cgroup v2 is mounted at {} (sees the address callers ask for, before socket-level load balancers){subtree}",
                    root.path.display()
                ),
            });
        }
        Err(why) if features.cgroup_root_set => {
            return Err(CaptureError::ModeUnavailable {
                mode: CaptureMode::Cgroup,
                missing: why.clone(),
                instead: "fix or unset CGROUP_ROOT".to_owned(),
            });
        }
        Err(_) => {}
    }
    let no_cgroup = features.missing(CaptureMode::Cgroup).unwrap_or_default();
    if features.kprobes {
        return Ok(Choice {
            chosen: Chosen::Kprobe,
            reason: format!("{no_cgroup}; kprobes are available"),
        });
    }
    if features.tracepoints {
        return Ok(Choice {
            chosen: Chosen::Tracepoint,
            reason: format!(
                "{no_cgroup}; {}; tracepoints are available",
                features.missing(CaptureMode::Kprobe).unwrap_or_default()
            ),
        });
    }
    Err(CaptureError::NoMode {
        reasons: [
            CaptureMode::Cgroup,
            CaptureMode::Kprobe,
            CaptureMode::Tracepoint,
        ]
        .into_iter()
        .filter_map(|m| features.missing(m).map(|why| format!("{m}: {why}")))
        .collect::<Vec<_>>()
        .join("; "),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn features(cgroup: bool, kprobes: bool, tracepoints: bool) -> Features {
        Features {
            cgroup: if cgroup {
                Ok(CgroupRoot {
                    path: "/sys/fs/cgroup".into(),
                    subtree: None,
                })
            } else {
                Err("no cgroup v2 hierarchy is mounted".to_owned())
            },
            cgroup_root_set: false,
            kprobes,
            tracepoints,
        }
    }

    #[test]
    fn auto_prefers_cgroup_then_kprobe_then_tracepoint() {
        let cases = [
            ((true, true, true), CaptureMode::Cgroup),
            ((true, false, false), CaptureMode::Cgroup),
            ((false, true, true), CaptureMode::Kprobe),
            ((false, false, true), CaptureMode::Tracepoint),
        ];
        for ((c, k, t), expected) in cases {
            let choice = choose(CaptureMode::Auto, &features(c, k, t)).unwrap();
            assert_eq!(choice.mode(), expected, "{c} {k} {t}");
        }
    }

    #[test]
    fn auto_says_why() {
        let choice = choose(CaptureMode::Auto, &features(true, false, true)).unwrap();
        assert_eq!(
            choice.reason,
            "cgroup v2 is mounted at /sys/fs/cgroup (sees the address callers ask for, before socket-level load balancers)"
        );
        assert_eq!(
            choice.cgroup().map(|c| c.path.clone()),
            Some("/sys/fs/cgroup".into())
        );
        let choice = choose(CaptureMode::Auto, &features(false, false, true)).unwrap();
        assert_eq!(
            choice.reason,
            format!(
                "no cgroup v2 hierarchy is mounted; this kernel has no kprobe events (CONFIG_KPROBE_EVENTS; {KPROBE_PMU} is missing); tracepoints are available"
            )
        );
        assert_eq!(choice.cgroup(), None);
    }

    #[test]
    fn a_forced_mode_the_kernel_lacks_says_what_is_missing_and_what_to_use() {
        let err = choose(CaptureMode::Kprobe, &features(true, false, true)).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "CAPTURE_MODE=kprobe: this kernel has no kprobe events (CONFIG_KPROBE_EVENTS; {KPROBE_PMU} is missing); use cgroup or tracepoint"
            )
        );
        let err = choose(CaptureMode::Cgroup, &features(false, false, true)).unwrap_err();
        assert_eq!(
            err.to_string(),
            "CAPTURE_MODE=cgroup: no cgroup v2 hierarchy is mounted; use tracepoint"
        );
        let err = choose(CaptureMode::Tracepoint, &features(false, false, false)).unwrap_err();
        assert!(
            err.to_string().ends_with(
                "is missing); and no other capture mode is available on this host either"
            ),
            "{err}"
        );
    }

    #[test]
    fn a_forced_mode_the_kernel_has_is_taken() {
        let choice = choose(CaptureMode::Tracepoint, &features(true, true, true)).unwrap();
        assert_eq!(choice.mode(), CaptureMode::Tracepoint);
        assert_eq!(choice.reason, "CAPTURE_MODE=tracepoint");
        assert_eq!(choice.cgroup(), None);
        let choice = choose(CaptureMode::Cgroup, &features(true, true, true)).unwrap();
        assert_eq!(
            choice.cgroup().map(|c| c.path.clone()),
            Some("/sys/fs/cgroup".into())
        );
    }

    #[test]
    fn a_bad_cgroup_root_setting_is_an_error_not_a_fallback() {
        let mut f = features(false, true, true);
        f.cgroup = Err("CGROUP_ROOT=/tmp: not a cgroup v2 directory".to_owned());
        f.cgroup_root_set = true;
        let err = choose(CaptureMode::Auto, &f).unwrap_err();
        assert_eq!(
            err.to_string(),
            "CAPTURE_MODE=cgroup: CGROUP_ROOT=/tmp: not a cgroup v2 directory; fix or unset CGROUP_ROOT"
        );
        // A forced other mode does not care.
        assert_eq!(
            choose(CaptureMode::Kprobe, &f).unwrap().mode(),
            CaptureMode::Kprobe
        );
    }

    #[test]
    fn nothing_available_lists_every_reason() {
        let err = choose(CaptureMode::Auto, &features(false, false, false)).unwrap_err();
        let msg = err.to_string();
        assert!(msg.starts_with("no capture mode works on this host: cgroup: no cgroup v2 hierarchy is mounted; kprobe: this kernel has no kprobe events"), "{msg}");
        assert!(
            msg.contains("; tracepoint: this kernel has no tracepoint events"),
            "{msg}"
        );
    }
}
