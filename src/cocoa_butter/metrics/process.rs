//! The process's own families, as every Prometheus client library exports
//! them (`process_*`): resident and virtual memory, CPU time, open file
//! descriptors against their limit, and the start time. Read from
//! `/proc/self` at each scrape, so they cost nothing between scrapes.
//!
//! They are process-wide: [`super::ProcessMetrics`] serves them once per
//! process, on the first enabled room's metrics port, without a `room`
//! label, like `choco_nats_connected`.

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Unit;

/// One reading of `/proc/self`.
#[derive(Debug, Clone, PartialEq)]
pub struct ProcessSample {
    pub cpu_seconds: f64,
    pub resident_bytes: i64,
    pub virtual_bytes: i64,
    pub start_time_seconds: f64,
    pub open_fds: i64,
    pub max_fds: i64,
}

impl ProcessSample {
    /// Reads the running process; `None` off Linux or when `/proc` is not
    /// mounted (the families are then left out, not reported as 0).
    pub fn read() -> Option<Self> {
        let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
        let boot_time = boot_time_seconds(&std::fs::read_to_string("/proc/stat").ok()?)?;
        let ticks = clock_ticks_per_second()?;
        let page = page_size()?;
        let fields = StatFields::parse(&stat)?;
        let open_fds = std::fs::read_dir("/proc/self/fd").ok()?.count() as i64;
        let max_fds = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
            .ok()
            .map_or(-1, |(soft, _)| i64::try_from(soft).unwrap_or(i64::MAX));
        Some(ProcessSample {
            cpu_seconds: (fields.utime + fields.stime) as f64 / ticks,
            resident_bytes: fields.rss_pages.saturating_mul(page),
            virtual_bytes: fields.vsize,
            start_time_seconds: boot_time + fields.starttime as f64 / ticks,
            // The read_dir above holds one descriptor of its own.
            open_fds: open_fds.saturating_sub(1),
            max_fds,
        })
    }
}

/// User + system CPU seconds of the process or thread whose `stat` file
/// is `path` (`/proc/<pid>/stat`, `/proc/self/task/<tid>/stat`): what the
/// benches read before and after a round.
pub fn cpu_seconds(path: &str) -> Option<f64> {
    let fields = StatFields::parse(&std::fs::read_to_string(path).ok()?)?;
    Some((fields.utime + fields.stime) as f64 / clock_ticks_per_second()?)
}

/// The fields of `/proc/<pid>/stat` the families need (proc(5)).
#[derive(Debug, PartialEq)]
struct StatFields {
    utime: u64,
    stime: u64,
    starttime: u64,
    vsize: i64,
    rss_pages: i64,
}

impl StatFields {
    fn parse(stat: &str) -> Option<Self> {
        // The command name (field 2) is in parentheses and may hold spaces
        // or parentheses itself: the fields start after the last ')'.
        let rest = &stat[stat.rfind(')')? + 1..];
        let fields: Vec<&str> = rest.split_whitespace().collect();
        // `rest` starts at field 3 (state), so field n is fields[n - 3].
        let field = |n: usize| fields.get(n - 3).copied();
        Some(StatFields {
            utime: field(14)?.parse().ok()?,
            stime: field(15)?.parse().ok()?,
            starttime: field(22)?.parse().ok()?,
            vsize: field(23)?.parse().ok()?,
            rss_pages: field(24)?.parse().ok()?,
        })
    }
}

fn boot_time_seconds(proc_stat: &str) -> Option<f64> {
    proc_stat
        .lines()
        .find_map(|line| line.strip_prefix("btime "))
        .and_then(|value| value.trim().parse().ok())
}

fn clock_ticks_per_second() -> Option<f64> {
    let ticks = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK).ok()??;
    (ticks > 0).then_some(ticks as f64)
}

fn page_size() -> Option<i64> {
    let size = nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE).ok()??;
    Some(size as i64)
}

/// Encodes a fresh [`ProcessSample`] at each scrape.
#[derive(Debug, Default)]
pub struct ProcessCollector;

impl Collector for ProcessCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let Some(sample) = ProcessSample::read() else {
            return Ok(());
        };
        let cpu = ConstCounter::new(sample.cpu_seconds);
        cpu.encode(encoder.encode_descriptor(
            "process_cpu",
            "Total user and system CPU time spent, in seconds",
            Some(&Unit::Seconds),
            cpu.metric_type(),
        )?)?;
        for (name, help, unit, value) in [
            (
                "process_resident_memory",
                "Resident memory size",
                Some(Unit::Bytes),
                sample.resident_bytes,
            ),
            (
                "process_virtual_memory",
                "Virtual memory size",
                Some(Unit::Bytes),
                sample.virtual_bytes,
            ),
            (
                "process_open_fds",
                "Open file descriptors",
                None,
                sample.open_fds,
            ),
            (
                "process_max_fds",
                "The soft limit on open file descriptors (after the raise at start)",
                None,
                sample.max_fds,
            ),
        ] {
            let gauge = ConstGauge::new(value);
            gauge.encode(encoder.encode_descriptor(
                name,
                help,
                unit.as_ref(),
                gauge.metric_type(),
            )?)?;
        }
        let start = ConstGauge::new(sample.start_time_seconds);
        start.encode(encoder.encode_descriptor(
            "process_start_time",
            "Start time of the process since the Unix epoch",
            Some(&Unit::Seconds),
            start.metric_type(),
        )?)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields_survive_a_command_name_with_spaces_and_parentheses() {
        let stat = "4242 (choco (x) y) S 1 4242 4242 0 -1 4194560 100 0 0 0 \
                    250 75 0 0 20 0 9 0 12345 987654321 2048 18446744073709551615";
        assert_eq!(
            StatFields::parse(stat),
            Some(StatFields {
                utime: 250,
                stime: 75,
                starttime: 12345,
                vsize: 987654321,
                rss_pages: 2048,
            })
        );
        assert_eq!(StatFields::parse("4242 (truncated"), None);
    }

    #[test]
    fn this_process_reads_as_alive() {
        let sample = ProcessSample::read().expect("/proc/self");
        assert!(sample.resident_bytes > 0 && sample.open_fds > 0);
        assert!(sample.max_fds >= sample.open_fds);
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("clock")
            .as_secs_f64();
        assert!(sample.start_time_seconds <= now + 1.0);
        assert!(sample.start_time_seconds > now - 86_400.0);
    }
}
