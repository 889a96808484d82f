//! The last result of every probe, and the two ways it is shown: the text
//! table `--once` prints and the status page (one plain HTML table, region
//! → node → probe, green or red with the last error; no JavaScript).

use std::collections::BTreeMap;
use std::fmt::Write;
use std::time::{Duration, SystemTime};

use parking_lot::Mutex;

use super::probe::{Outcome, ProbeId};

/// What is known of one probe.
#[derive(Debug, Clone, Default)]
pub struct Entry {
    /// The last run, if any finished yet.
    pub last: Option<Outcome>,
    /// When it finished.
    pub at: Option<SystemTime>,
    /// Runs so far.
    pub runs: u64,
    /// Failed runs so far.
    pub failures: u64,
}

/// Every probe's last result.
#[derive(Default)]
pub struct Status {
    entries: Mutex<BTreeMap<ProbeId, Entry>>,
}

impl Status {
    /// Knows `ids` (shown as pending until they ran).
    pub fn new(ids: impl IntoIterator<Item = ProbeId>) -> Status {
        Status {
            entries: Mutex::new(ids.into_iter().map(|i| (i, Entry::default())).collect()),
        }
    }

    /// Records one run.
    pub fn record(&self, id: &ProbeId, o: &Outcome) {
        let mut e = self.entries.lock();
        let entry = e.entry(id.clone()).or_default();
        entry.runs += 1;
        if !o.is_ok() {
            entry.failures += 1;
        }
        entry.last = Some(o.clone());
        entry.at = Some(SystemTime::now());
    }

    /// Every probe, in table order: region, node, pair, kind.
    pub fn snapshot(&self) -> Vec<(ProbeId, Entry)> {
        self.entries
            .lock()
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    /// Probes whose last run failed or that never ran.
    pub fn failing(&self) -> usize {
        self.entries
            .lock()
            .values()
            .filter(|e| !e.last.as_ref().is_some_and(Outcome::is_ok))
            .count()
    }

    /// The text table `--once` prints.
    pub fn table(&self) -> String {
        let rows: Vec<[String; 6]> = self
            .snapshot()
            .into_iter()
            .map(|(id, e)| {
                let (result, latency, detail) = cells(&e);
                [
                    id.region.clone(),
                    id.target(),
                    id.kind.label().to_owned(),
                    result.to_owned(),
                    latency,
                    detail,
                ]
            })
            .collect();
        let head = ["REGION", "NODE", "PROBE", "RESULT", "LATENCY", "DETAIL"];
        let mut widths = head.map(str::len);
        for r in &rows {
            for (w, c) in widths.iter_mut().zip(r) {
                *w = (*w).max(c.chars().count());
            }
        }
        let mut out = String::new();
        let line = |out: &mut String, cells: [&str; 6]| {
            for (i, (c, w)) in cells.iter().zip(widths).enumerate() {
                if i == 5 {
                    out.push_str(c);
                } else {
                    let _ = write!(out, "{c:<w$}  ");
                }
            }
            out.truncate(out.trim_end().len());
            out.push('\n');
        };
        line(&mut out, head);
        for r in &rows {
            line(&mut out, r.each_ref().map(String::as_str));
        }
        let total = rows.len();
        let failing = self.failing();
        let _ = writeln!(
            out,
            "{total} probes, {} ok, {failing} failed",
            total - failing
        );
        out
    }

    /// The status page.
    pub fn html(&self) -> String {
        let snap = self.snapshot();
        let failing = self.failing();
        let mut out = String::from(
            "<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\">\
             <meta http-equiv=\"refresh\" content=\"15\">\
             <title>derpd prober</title><style>\
             body{font-family:sans-serif;margin:1em}\
             table{border-collapse:collapse}\
             td,th{border:1px solid #999;padding:2px 8px;text-align:left;vertical-align:top}\
             .ok{background:#c8f0c8}.fail{background:#f6c0c0}.pending{background:#eee}\
             </style></head><body>\n<h1>derpd prober</h1>\n",
        );
        let _ = writeln!(
            out,
            "<p>{} probes, {failing} failing. <a href=\"/metrics\">metrics</a></p>",
            snap.len()
        );
        out.push_str(
            "<table>\n<tr><th>Region</th><th>Node</th><th>Probe</th><th>Result</th>\
             <th>Latency</th><th>Last run</th><th>Runs (failed)</th><th>Detail</th></tr>\n",
        );
        for (id, e) in &snap {
            let class = match &e.last {
                None => "pending",
                Some(o) if o.is_ok() => "ok",
                Some(_) => "fail",
            };
            let (result, latency, detail) = cells(e);
            let ago =
                e.at.and_then(|t| t.elapsed().ok())
                    .map(|d| format!("{}s ago", d.as_secs()))
                    .unwrap_or_default();
            let _ = writeln!(
                out,
                "<tr class=\"{class}\"><td>{}</td><td>{}</td><td>{}</td><td>{result}</td>\
                 <td>{}</td><td>{ago}</td><td>{} ({})</td><td>{}</td></tr>",
                escape(&id.region),
                escape(&id.target()),
                id.kind.label(),
                escape(&latency),
                e.runs,
                e.failures,
                escape(&detail),
            );
        }
        out.push_str("</table>\n</body></html>\n");
        out
    }
}

/// (result, latency, detail) of an entry.
fn cells(e: &Entry) -> (&'static str, String, String) {
    match &e.last {
        None => ("pending", "-".into(), String::new()),
        Some(o) => match &o.result {
            Ok(()) => ("ok", latency(o.latency), o.note.clone()),
            Err(why) => {
                let detail = if o.note.is_empty() {
                    why.clone()
                } else {
                    format!("{why} ({})", o.note)
                };
                ("FAIL", "-".into(), detail)
            }
        },
    }
}

fn latency(d: Duration) -> String {
    let ms = d.as_secs_f64() * 1000.0;
    if ms < 10.0 {
        format!("{ms:.2}ms")
    } else {
        format!("{ms:.0}ms")
    }
}

fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '&' => out.push_str("&amp;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::prober::probe::Kind;

    fn id(node: &str, to: Option<&str>, kind: Kind) -> ProbeId {
        ProbeId {
            region: "dev".into(),
            node: node.into(),
            to: to.map(str::to_owned),
            kind,
        }
    }

    #[test]
    fn table_and_page_show_results_and_errors() {
        let s = Status::new([id("a", None, Kind::Tls), id("b", None, Kind::Tls)]);
        s.record(
            &id("a", None, Kind::Tls),
            &Outcome::ok(Duration::from_micros(1500)).with_note("cert expires in 4.9 days"),
        );
        s.record(
            &id("a", Some("b"), Kind::Mesh),
            &Outcome::fail(Duration::from_secs(2), "no packet <lost>"),
        );
        let t = s.table();
        assert!(
            t.contains("dev     a     tls    ok       1.50ms   cert expires in 4.9 days\n"),
            "{t}"
        );
        assert!(
            t.contains("a->b  mesh   FAIL     -        no packet <lost>\n"),
            "{t}"
        );
        assert!(t.contains("dev     b     tls    pending  -\n"), "{t}");
        assert!(t.ends_with("3 probes, 1 ok, 2 failed\n"), "{t}");
        assert_eq!(s.failing(), 2);
        let h = s.html();
        assert!(
            h.contains("<tr class=\"ok\"><td>dev</td><td>a</td><td>tls</td>"),
            "{h}"
        );
        assert!(h.contains("no packet &lt;lost&gt;"), "{h}");
        assert!(h.contains("class=\"pending\""), "{h}");
        assert!(!h.contains("<script"), "{h}");
    }
}
