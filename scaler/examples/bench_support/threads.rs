//! How often the scaler's threads sleep and how long they wait for a CPU,
//! from /proc, grouped by thread name: the serving threads (tokio's default
//! name, `tokio-runtime-w` once the kernel cuts it to 15 bytes) and the
//! ingest threads (`itw-ingest`). Each voluntary context switch is one sleep,
//! so one wake-up; the run-queue wait (schedstat's second field) is the time
//! a woken thread waited for a core. A GetMetrics tail outside the handler
//! is that wait, paid once per wake that found the cores busy (#18).

use std::{collections::BTreeMap, fs};

use anyhow::Context;

/// Counters of one group of threads, summed.
#[derive(Debug, Default, Clone, Copy, PartialEq)]
struct Counters {
    threads: u64,
    voluntary: u64,
    involuntary: u64,
    run_ns: u64,
    wait_ns: u64,
}

/// Every thread of a process at one moment, by name.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Threads(BTreeMap<String, Counters>);

impl Threads {
    pub fn sample(pid: u32) -> anyhow::Result<Self> {
        let dir = format!("/proc/{pid}/task");
        let mut groups = BTreeMap::<String, Counters>::new();
        for entry in fs::read_dir(&dir).with_context(|| format!("reading {dir}"))? {
            let path = entry?.path();
            // A thread that ended between the listing and the reads is left
            // out: its counts went with it.
            let (Ok(comm), Ok(status), Ok(schedstat)) = (
                fs::read_to_string(path.join("comm")),
                fs::read_to_string(path.join("status")),
                fs::read_to_string(path.join("schedstat")),
            ) else {
                continue;
            };
            let thread = parse(&status, &schedstat)
                .with_context(|| format!("{}: unexpected status or schedstat", path.display()))?;
            let group = groups.entry(comm.trim().to_owned()).or_default();
            group.threads += 1;
            group.voluntary += thread.voluntary;
            group.involuntary += thread.involuntary;
            group.run_ns += thread.run_ns;
            group.wait_ns += thread.wait_ns;
        }
        Ok(Self(groups))
    }

    /// One line per group that ran since `before`: wakes (voluntary
    /// switches) and preemptions per second and per thread, CPU and
    /// run-queue wait in ms per second, over `secs` seconds.
    pub fn summary_since(&self, before: &Self, secs: f64) -> Vec<String> {
        self.0
            .iter()
            .filter_map(|(name, now)| {
                let was = before.0.get(name).copied().unwrap_or_default();
                let d = |a: u64, b: u64| a.saturating_sub(b) as f64;
                let run = d(now.run_ns, was.run_ns);
                if run == 0.0 {
                    return None;
                }
                let threads = now.threads.max(1) as f64;
                let wakes = d(now.voluntary, was.voluntary) / secs;
                Some(format!(
                    "{name} x{}: {:.0} wakes/s ({:.0} per thread), {:.0} preemptions/s, CPU {:.0} ms/s, run-queue wait {:.0} ms/s ({:.1} us per wake or preemption)",
                    now.threads,
                    wakes,
                    wakes / threads,
                    d(now.involuntary, was.involuntary) / secs,
                    run / 1e6 / secs,
                    d(now.wait_ns, was.wait_ns) / 1e6 / secs,
                    d(now.wait_ns, was.wait_ns)
                        / 1e3
                        / (d(now.voluntary, was.voluntary) + d(now.involuntary, was.involuntary))
                            .max(1.0),
                ))
            })
            .collect()
    }
}

/// One thread's counters from its `status` and `schedstat` files.
fn parse(status: &str, schedstat: &str) -> Option<Counters> {
    let field = |name: &str| -> Option<u64> {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))?
            .trim()
            .parse()
            .ok()
    };
    let mut sched = schedstat.split_whitespace().map(str::parse::<u64>);
    Some(Counters {
        threads: 1,
        voluntary: field("voluntary_ctxt_switches:")?,
        involuntary: field("nonvoluntary_ctxt_switches:")?,
        run_ns: sched.next()?.ok()?,
        wait_ns: sched.next()?.ok()?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_thread_reads_from_status_and_schedstat() {
        let status = "Name:\tx\nvoluntary_ctxt_switches:\t120\nnonvoluntary_ctxt_switches:\t7\n";
        assert_eq!(
            parse(status, "5000000 2000000 127\n"),
            Some(Counters {
                threads: 1,
                voluntary: 120,
                involuntary: 7,
                run_ns: 5_000_000,
                wait_ns: 2_000_000,
            })
        );
        assert_eq!(parse("Name:\tx\n", "1 2 3\n"), None);
    }

    #[test]
    fn a_phase_is_the_difference_per_second() {
        let group = |voluntary, involuntary, run_ns, wait_ns| Counters {
            threads: 2,
            voluntary,
            involuntary,
            run_ns,
            wait_ns,
        };
        let before = Threads(BTreeMap::from([
            ("w".into(), group(100, 10, 1_000_000, 0)),
            ("idle".into(), group(5, 0, 10, 0)),
        ]));
        let after = Threads(BTreeMap::from([
            ("w".into(), group(2_100, 210, 201_000_000, 44_000_000)),
            ("idle".into(), group(5, 0, 10, 0)),
        ]));
        assert_eq!(
            after.summary_since(&before, 2.0),
            vec![
                "w x2: 1000 wakes/s (500 per thread), 100 preemptions/s, CPU 100 ms/s, run-queue wait 22 ms/s (20.0 us per wake or preemption)"
                    .to_owned()
            ]
        );
    }
}
