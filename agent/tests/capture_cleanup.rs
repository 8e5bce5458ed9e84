//! After a process that loaded the capture ends, `bpftool` shows nothing of
//! it: no program, no map, no link, no cgroup attachment. Whether the process
//! dropped its capture and exited, or was killed (a crash).
//!
//! The loading process is a child (this test binary run again for its
//! `cleanup_child` test), so the check is exact however many other programs
//! of ours other tests or agents have loaded meanwhile: it follows the ids the
//! child reports. Its own binary, so no test loading programs in parallel
//! shares its process.

mod capture_support;

use std::{
    io::{BufRead, BufReader, Write},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use capture_support as support;
use itw_agent::capture::{CaptureMode, mode};

const CHILD_ENV: &str = "ITW_CLEANUP_CHILD";

fn bpftool(args: &[&str]) -> Option<(bool, String)> {
    let out = Command::new("bpftool").args(args).output().ok()?;
    let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&out.stderr));
    Some((out.status.success(), text))
}

/// What the child loaded, as it reports it.
#[derive(Debug, Default)]
struct Loaded {
    /// (name, id)
    programs: Vec<(String, u32)>,
    maps: Vec<u32>,
    cgroup: Option<String>,
}

fn modes_here() -> Vec<CaptureMode> {
    let features = mode::detect(None);
    features.available()
}

#[derive(Clone, Copy, Debug)]
enum Exit {
    /// The child drops its captures and returns.
    Drop,
    /// The child is killed with SIGKILL.
    Kill,
}

fn run(exit: Exit) {
    if !support::is_root() {
        support::skip("not running as root, which loading eBPF programs needs");
        return;
    }
    if bpftool(&["version"]).is_none() {
        support::skip("bpftool is not installed (Debian package bpftool)");
        return;
    }
    let modes: Vec<_> = modes_here().iter().map(|m| m.as_str()).collect();
    assert!(!modes.is_empty(), "no capture mode on this host");

    let exe = std::env::current_exe().unwrap();
    let mut child = Command::new(exe)
        .args([
            "--exact",
            "cleanup_child",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, modes.join(","))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("starting the child");
    let stdout = child.stdout.take().unwrap();
    let mut loaded = Loaded::default();
    let mut lines = BufReader::new(stdout).lines();
    for line in lines.by_ref() {
        let line = line.unwrap();
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["loaded-program", name, id] => loaded
                .programs
                .push(((*name).to_owned(), id.parse().unwrap())),
            ["loaded-map", id] => loaded.maps.push(id.parse().unwrap()),
            ["cgroup", path] => loaded.cgroup = Some((*path).to_owned()),
            ["skipped"] => {
                let _ = child.wait();
                support::skip("the child could not load the programs");
                return;
            }
            ["ready"] => break,
            _ => {}
        }
    }
    assert!(
        !loaded.programs.is_empty(),
        "the child reported no programs"
    );
    assert!(!loaded.maps.is_empty(), "the child reported no maps");

    // While the child lives, bpftool shows each of them: the check below
    // looks at the right things.
    let (_, links) = bpftool(&["link", "list"]).unwrap();
    for (name, id) in &loaded.programs {
        let (ok, text) = bpftool(&["prog", "show", "id", &id.to_string()]).unwrap();
        // The kernel keeps 15 bytes of a program name.
        let short = &name[..name.len().min(15)];
        assert!(
            ok && text.contains(&format!("name {short} ")),
            "program {id}: {text}"
        );
        assert!(
            mentions(&links, "prog", *id),
            "no link runs program {id}:\n{links}"
        );
    }
    if let Some(root) = &loaded.cgroup {
        let (_, text) = bpftool(&["cgroup", "show", root]).unwrap();
        for (name, id) in &loaded.programs {
            if name.starts_with("itw_connect") {
                assert!(
                    text.contains(&id.to_string()),
                    "{name} {id} not attached to {root}:\n{text}"
                );
            }
        }
    }
    for id in &loaded.maps {
        let (ok, text) = bpftool(&["map", "show", "id", &id.to_string()]).unwrap();
        assert!(ok, "map {id}: {text}");
    }

    match exit {
        Exit::Drop => {
            let mut stdin = child.stdin.take().unwrap();
            writeln!(stdin, "exit").unwrap();
            // Read the child's last words, or its writes fail on a closed pipe.
            for line in lines {
                line.unwrap();
            }
        }
        Exit::Kill => child.kill().unwrap(),
    }
    let status = child.wait().unwrap();
    if let Exit::Drop = exit {
        assert!(status.success(), "the child failed: {status}");
    }

    // The kernel frees programs and maps shortly after their last reference
    // goes (deferred work): poll.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let left = leftovers(&loaded);
        if left.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "still in the kernel after the child exited: {left:#?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// What bpftool still shows of `loaded`.
fn leftovers(loaded: &Loaded) -> Vec<String> {
    let mut left = Vec::new();
    for (name, id) in &loaded.programs {
        let (ok, text) = bpftool(&["prog", "show", "id", &id.to_string()]).unwrap();
        if ok || !text.contains("No such file or directory") {
            left.push(format!("program {name} {id}: {text}"));
        }
    }
    for id in &loaded.maps {
        let (ok, text) = bpftool(&["map", "show", "id", &id.to_string()]).unwrap();
        if ok || !text.contains("No such file or directory") {
            left.push(format!("map {id}: {text}"));
        }
    }
    let (_, links) = bpftool(&["link", "list"]).unwrap();
    for (name, id) in &loaded.programs {
        if mentions(&links, "prog", *id) {
            left.push(format!("a link of program {name} {id}"));
        }
    }
    if let Some(root) = &loaded.cgroup {
        let (_, text) = bpftool(&["cgroup", "show", root]).unwrap();
        for (name, id) in &loaded.programs {
            if text.split_whitespace().any(|w| w == id.to_string()) {
                left.push(format!("{name} {id} attached to {root}"));
            }
        }
    }
    left
}

/// `text` has the words `label id` in a row.
fn mentions(text: &str, label: &str, id: u32) -> bool {
    let id = id.to_string();
    let words: Vec<&str> = text.split_whitespace().collect();
    words.windows(2).any(|w| w[0] == label && w[1] == id)
}

#[test]
fn nothing_stays_after_the_process_drops_its_capture_and_exits() {
    run(Exit::Drop);
}

#[test]
fn nothing_stays_after_the_process_is_killed() {
    run(Exit::Kill);
}

/// The loading process of the tests above (run only by them).
#[test]
#[ignore = "the child process of the cleanup tests; they run it"]
fn cleanup_child() {
    let Ok(modes) = std::env::var(CHILD_ENV) else {
        panic!("run by the cleanup tests only, with {CHILD_ENV} set");
    };
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let _guard = runtime.enter();
    let mut captures = Vec::new();
    for name in modes.split(',') {
        let mode = match name {
            "cgroup" => CaptureMode::Cgroup,
            "kprobe" => CaptureMode::Kprobe,
            "tracepoint" => CaptureMode::Tracepoint,
            other => panic!("unknown mode {other}"),
        };
        let Some(started) = support::start(mode, |_| {}) else {
            println!("skipped");
            return;
        };
        for (name, id) in &started.objects.programs {
            println!("loaded-program {name} {id}");
        }
        for id in &started.objects.maps {
            println!("loaded-map {id}");
        }
        if let Some(root) = started.attached_to.strip_prefix("cgroup ") {
            println!("cgroup {root}");
        }
        captures.push(started);
    }
    println!("ready");
    let mut line = String::new();
    std::io::stdin().read_line(&mut line).unwrap();
    drop(captures);
}
