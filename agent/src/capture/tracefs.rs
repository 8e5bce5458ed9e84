//! tracefs for the tracepoint mode: mounting it where it is absent, and the
//! field offsets of `sock:inet_sock_set_state` from its format file.
//!
//! The loader (aya) looks tracefs up once per process, at the first
//! tracepoint attach, only at `/sys/kernel/tracing` and
//! `/sys/kernel/debug/tracing`, and keeps a failed lookup: tracefs must be
//! mounted at one of those before that attach.

use std::{
    ffi::CString,
    os::unix::ffi::OsStrExt,
    path::{Path, PathBuf},
};

use super::CaptureError;

/// Where the loader looks for tracefs.
pub const KNOWN_PATHS: [&str; 2] = ["/sys/kernel/tracing", "/sys/kernel/debug/tracing"];

/// The tracepoint the tracepoint mode attaches to.
pub const CATEGORY: &str = "sock";
pub const EVENT: &str = "inet_sock_set_state";

/// Byte offsets of the fields the program reads, in the event's record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SetStateOffsets {
    pub newstate: u32,
    pub dport: u32,
    pub family: u32,
    pub protocol: u32,
    pub daddr: u32,
    pub daddr_v6: u32,
}

impl SetStateOffsets {
    /// For tracepoint programs that are loaded but never attached: the
    /// object needs values, and none is read.
    pub const UNATTACHED: Self = Self {
        newstate: 0,
        dport: 0,
        family: 0,
        protocol: 0,
        daddr: 0,
        daddr_v6: 0,
    };
}

/// Mounts tracefs at `path` unless it is there already. Returns whether it
/// mounted it. The mount is left in place at exit: other tools may use it
/// by then, and it costs nothing.
pub fn ensure_mounted(path: &Path) -> Result<bool, CaptureError> {
    let tracefs_error = |reason: String| CaptureError::Tracefs {
        path: path.to_owned(),
        reason,
    };
    if !KNOWN_PATHS.iter().any(|known| Path::new(known) == path) {
        return Err(tracefs_error(format!(
            "the eBPF loader finds tracefs only at {}; set TRACEFS_PATH to one of them",
            KNOWN_PATHS.join(" or ")
        )));
    }
    if path.join("events").is_dir() {
        return Ok(false);
    }
    if !path.is_dir() {
        return Err(tracefs_error(
            "the directory does not exist (is sysfs, or debugfs for /sys/kernel/debug/tracing, mounted?)"
                .to_owned(),
        ));
    }
    let target = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| tracefs_error("the path contains a NUL byte".to_owned()))?;
    let flags = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
    // SAFETY: all pointers are valid NUL-terminated strings or null.
    let rc = unsafe {
        libc::mount(
            c"tracefs".as_ptr(),
            target.as_ptr(),
            c"tracefs".as_ptr(),
            flags,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        let err = std::io::Error::last_os_error();
        return Err(tracefs_error(format!(
            "tracefs is not mounted there and mounting it failed: {err} (the agent needs CAP_SYS_ADMIN for that, or mount it beforehand: mount -t tracefs tracefs {})",
            path.display()
        )));
    }
    tracing::info!(path = %path.display(), "mounted tracefs");
    Ok(true)
}

/// The path of the event's format file under a tracefs mount.
pub fn format_path(tracefs: &Path) -> PathBuf {
    tracefs
        .join("events")
        .join(CATEGORY)
        .join(EVENT)
        .join("format")
}

/// Reads and parses the event's format file.
pub fn set_state_offsets(tracefs: &Path) -> Result<SetStateOffsets, CaptureError> {
    let path = format_path(tracefs);
    let text = std::fs::read_to_string(&path).map_err(|e| CaptureError::TracepointFormat {
        path: path.clone(),
        reason: format!(
            "{e} (this kernel has no {CATEGORY}:{EVENT} tracepoint, or tracefs is not mounted there)"
        ),
    })?;
    parse_set_state_format(&text).map_err(|reason| CaptureError::TracepointFormat { path, reason })
}

/// The offsets of the fields the program reads, each checked for the size the
/// program reads it with.
pub fn parse_set_state_format(text: &str) -> Result<SetStateOffsets, String> {
    let fields = parse_fields(text);
    let field = |name: &str, size: u32| -> Result<u32, String> {
        let found = fields
            .iter()
            .find(|f| f.name == name)
            .ok_or_else(|| format!("no field {name:?}"))?;
        if found.size != size {
            return Err(format!(
                "field {name:?} is {} bytes; the program reads {size}",
                found.size
            ));
        }
        Ok(found.offset)
    };
    Ok(SetStateOffsets {
        newstate: field("newstate", 4)?,
        dport: field("dport", 2)?,
        family: field("family", 2)?,
        protocol: field("protocol", 2)?,
        daddr: field("daddr", 4)?,
        daddr_v6: field("daddr_v6", 16)?,
    })
}

#[derive(Debug, PartialEq, Eq)]
struct Field<'a> {
    name: &'a str,
    offset: u32,
    size: u32,
}

/// The `field:<decl>;\toffset:N;\tsize:N;\tsigned:N;` lines of a format file.
/// Lines that do not have that shape are skipped.
fn parse_fields(text: &str) -> Vec<Field<'_>> {
    text.lines()
        .filter_map(|line| {
            let mut parts = line.trim().split(';').map(str::trim);
            let decl = parts.next()?.strip_prefix("field:")?;
            // The name is the declaration's last word, without an array suffix:
            // `__u8 daddr_v6[16]` -> `daddr_v6`.
            let last = decl.rsplit([' ', '*']).next()?;
            let name = last.split('[').next()?;
            let mut offset = None;
            let mut size = None;
            for part in parts {
                if let Some(v) = part.strip_prefix("offset:") {
                    offset = v.parse().ok();
                } else if let Some(v) = part.strip_prefix("size:") {
                    size = v.parse().ok();
                }
            }
            Some(Field {
                name,
                offset: offset?,
                size: size?,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The format file of Linux 6.1 to 6.18.
    const FORMAT: &str = "name: inet_sock_set_state
ID: 2287
format:
\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;
\tfield:unsigned char common_flags;\toffset:2;\tsize:1;\tsigned:0;
\tfield:unsigned char common_preempt_count;\toffset:3;\tsize:1;\tsigned:0;
\tfield:int common_pid;\toffset:4;\tsize:4;\tsigned:1;

\tfield:const void * skaddr;\toffset:8;\tsize:8;\tsigned:0;
\tfield:int oldstate;\toffset:16;\tsize:4;\tsigned:1;
\tfield:int newstate;\toffset:20;\tsize:4;\tsigned:1;
\tfield:__u16 sport;\toffset:24;\tsize:2;\tsigned:0;
\tfield:__u16 dport;\toffset:26;\tsize:2;\tsigned:0;
\tfield:__u16 family;\toffset:28;\tsize:2;\tsigned:0;
\tfield:__u16 protocol;\toffset:30;\tsize:2;\tsigned:0;
\tfield:__u8 saddr[4];\toffset:32;\tsize:4;\tsigned:0;
\tfield:__u8 daddr[4];\toffset:36;\tsize:4;\tsigned:0;
\tfield:__u8 saddr_v6[16];\toffset:40;\tsize:16;\tsigned:0;
\tfield:__u8 daddr_v6[16];\toffset:56;\tsize:16;\tsigned:0;

print fmt: \"family=%s protocol=%s\", REC->family, REC->protocol
";

    #[test]
    fn parses_the_offsets_of_the_fields_read() {
        assert_eq!(
            parse_set_state_format(FORMAT),
            Ok(SetStateOffsets {
                newstate: 20,
                dport: 26,
                family: 28,
                protocol: 30,
                daddr: 36,
                daddr_v6: 56,
            })
        );
    }

    #[test]
    fn field_names_drop_types_pointers_and_array_suffixes() {
        let fields = parse_fields(FORMAT);
        assert_eq!(fields.len(), 15);
        assert_eq!(
            fields[4],
            Field {
                name: "skaddr",
                offset: 8,
                size: 8
            }
        );
        assert_eq!(
            parse_fields("\tfield:char *name;\toffset:4;\tsize:8;\tsigned:0;"),
            vec![Field {
                name: "name",
                offset: 4,
                size: 8
            }]
        );
    }

    #[test]
    fn a_missing_or_resized_field_is_named() {
        let without = FORMAT.replace("daddr_v6[16]", "dst6[16]");
        assert_eq!(
            parse_set_state_format(&without),
            Err("no field \"daddr_v6\"".to_owned())
        );
        let resized = FORMAT.replace("offset:26;\tsize:2;", "offset:26;\tsize:4;");
        assert_eq!(
            parse_set_state_format(&resized),
            Err("field \"dport\" is 4 bytes; the program reads 2".to_owned())
        );
        assert_eq!(
            parse_set_state_format("garbage"),
            Err("no field \"newstate\"".to_owned())
        );
    }

    #[test]
    fn a_tracefs_path_the_loader_does_not_search_is_refused() {
        let err = ensure_mounted(Path::new("/mnt/tracing")).unwrap_err();
        assert_eq!(
            err.to_string(),
            "tracefs at /mnt/tracing: the eBPF loader finds tracefs only at /sys/kernel/tracing or /sys/kernel/debug/tracing; set TRACEFS_PATH to one of them"
        );
    }
}
