//! Reporting: the `--json PATH` writer, a plain-text table printer and run metadata.
//!
//! Every benchmark result is a JSON object: `{"bench": NAME, "meta": {...}, ...figures}`,
//! with ratio fields named `…_vs_kernel` (see [`crate::stats::vs_kernel_field`]).

use std::path::Path;

use serde::Serialize;
use serde_json::{Map, Value};

use crate::error::{Error, Result};

/// Facts about the run that make figures comparable run to run.
pub fn run_meta() -> Value {
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let mem_kib = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        .unwrap_or(0);
    let unix_time = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    serde_json::json!({
        "kernel": kernel.trim(),
        "cpus": cpus,
        "mem_total_bytes": mem_kib * 1024,
        "unix_time": unix_time,
        "args": std::env::args().collect::<Vec<_>>(),
    })
}

/// The current time as `YYYY-MM-DD HH:MM UTC` (plots and results pages are dated with it).
pub fn now_utc() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    utc_date(secs)
}

/// `secs` since the epoch as `YYYY-MM-DD HH:MM UTC` (proleptic Gregorian calendar; Howard
/// Hinnant's days-to-civil algorithm).
pub fn utc_date(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let (hh, mm) = ((secs % 86_400) / 3600, (secs % 3600) / 60);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02} {hh:02}:{mm:02} UTC")
}

/// A JSON report under construction.
#[derive(Debug, Clone)]
pub struct JsonReport {
    root: Map<String, Value>,
}

impl JsonReport {
    /// A report for benchmark `bench`, with [`run_meta`].
    pub fn new(bench: &str) -> Self {
        let mut root = Map::new();
        root.insert("bench".into(), Value::String(bench.into()));
        root.insert("meta".into(), run_meta());
        Self { root }
    }

    /// Sets `key` to `value` (serialised).
    pub fn insert(&mut self, key: &str, value: impl Serialize) -> Result<()> {
        self.root.insert(key.into(), serde_json::to_value(value)?);
        Ok(())
    }

    /// The report as a JSON value.
    pub fn to_value(&self) -> Value {
        Value::Object(self.root.clone())
    }

    /// Writes the report, pretty-printed, to `path`.
    pub fn write(&self, path: &Path) -> Result<()> {
        write_json(path, &self.to_value())
    }
}

/// Writes `value` pretty-printed to `path` (parent directories created).
pub fn write_json(path: &Path, value: &impl Serialize) -> Result<()> {
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(|e| Error::io("mkdir", parent, e))?;
    }
    let text = serde_json::to_string_pretty(value)?;
    std::fs::write(path, text + "\n").map_err(|e| Error::io("write", path, e))
}

/// A plain-text table: a header row, then rows; columns padded to their widest cell,
/// numbers right-aligned.
#[derive(Debug, Clone, Default)]
pub struct Table {
    header: Vec<String>,
    rows: Vec<Vec<String>>,
}

impl Table {
    /// A table with these column titles.
    pub fn new(header: &[&str]) -> Self {
        Self {
            header: header.iter().map(|s| s.to_string()).collect(),
            rows: Vec::new(),
        }
    }

    /// Appends a row (missing cells print empty).
    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    /// Renders the table.
    pub fn render(&self) -> String {
        let cols = self
            .header
            .len()
            .max(self.rows.iter().map(Vec::len).max().unwrap_or(0));
        let mut width = vec![0usize; cols];
        for r in std::iter::once(&self.header).chain(&self.rows) {
            for (i, c) in r.iter().enumerate() {
                width[i] = width[i].max(c.chars().count());
            }
        }
        let line = |r: &Vec<String>| {
            let mut s = String::new();
            for (i, w) in width.iter().enumerate() {
                let c = r.get(i).map_or("", String::as_str);
                let numeric = c.parse::<f64>().is_ok()
                    || c.ends_with('x') && c[..c.len() - 1].parse::<f64>().is_ok();
                if i > 0 {
                    s.push_str("  ");
                }
                if numeric {
                    s.push_str(&format!("{c:>w$}"));
                } else {
                    s.push_str(&format!("{c:<w$}"));
                }
            }
            s.trim_end().to_string()
        };
        let mut out = line(&self.header);
        out.push('\n');
        out.push_str(
            &width
                .iter()
                .map(|w| "-".repeat(*w))
                .collect::<Vec<_>>()
                .join("  "),
        );
        out.push('\n');
        for r in &self.rows {
            out.push_str(&line(r));
            out.push('\n');
        }
        out
    }
}

/// Formats a float with `digits` decimals, `-` for NaN / None.
pub fn fmt_f(v: Option<f64>, digits: usize) -> String {
    match v {
        Some(x) if x.is_finite() => format!("{x:.digits$}"),
        _ => "-".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::utc_date;

    #[test]
    fn utc_dates() {
        assert_eq!(utc_date(0), "1970-01-01 00:00 UTC");
        // 2026-12-07 11:35:44 UTC
        assert_eq!(utc_date(1_796_643_344), "2026-12-07 11:35 UTC");
        // 2024-02-29 23:59 UTC (leap day)
        assert_eq!(utc_date(1_709_251_140), "2024-02-29 23:59 UTC");
    }
}
