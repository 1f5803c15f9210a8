//! The Prometheus text exposition format, version 0.0.4: families with
//! `# HELP` and `# TYPE`, their samples together, label values escaped.
//! <https://prometheus.io/docs/instrumenting/exposition_formats/>

use std::collections::BTreeSet;
use std::fmt::Write as _;

/// The `Content-Type` of a scrape answer in this format.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
}

impl Kind {
    fn as_str(self) -> &'static str {
        match self {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
        }
    }
}

/// One scrape's text. A family's samples must be contiguous, so each
/// family is written whole through [`Exposition::family`]; a name given
/// twice is a programming error (checked in debug builds, skipped otherwise,
/// since Prometheus rejects a scrape with a repeated family).
#[derive(Default)]
pub struct Exposition {
    out: String,
    names: BTreeSet<String>,
}

pub struct Family<'a> {
    out: &'a mut String,
    name: &'a str,
    live: bool,
}

impl Exposition {
    pub fn new() -> Exposition {
        Exposition::default()
    }

    pub fn family<'a>(&'a mut self, name: &'a str, kind: Kind, help: &str) -> Family<'a> {
        debug_assert!(valid_name(name), "metric name {name:?}");
        debug_assert!(
            kind != Kind::Counter || name.ends_with("_total"),
            "counter {name:?}"
        );
        let fresh = self.names.insert(name.to_string());
        debug_assert!(fresh, "metric family {name:?} written twice");
        if fresh {
            let _ = write!(self.out, "# HELP {name} ");
            escape_into(&mut self.out, help, false);
            let _ = writeln!(self.out, "\n# TYPE {name} {}", kind.as_str());
        }
        Family {
            out: &mut self.out,
            name,
            live: fresh,
        }
    }

    /// A family with one sample and no labels.
    pub fn single(&mut self, name: &str, kind: Kind, help: &str, value: f64) {
        self.family(name, kind, help).sample(&[], value);
    }

    pub fn finish(self) -> String {
        self.out
    }
}

impl Family<'_> {
    pub fn sample(&mut self, labels: &[(&str, &str)], value: f64) -> &mut Self {
        if !self.live {
            return self;
        }
        self.out.push_str(self.name);
        if !labels.is_empty() {
            self.out.push('{');
            for (i, (k, v)) in labels.iter().enumerate() {
                debug_assert!(valid_label(k), "label name {k:?}");
                if i > 0 {
                    self.out.push(',');
                }
                self.out.push_str(k);
                self.out.push_str("=\"");
                escape_into(self.out, v, true);
                self.out.push('"');
            }
            self.out.push('}');
        }
        self.out.push(' ');
        push_value(self.out, value);
        self.out.push('\n');
        self
    }
}

/// HELP text escapes `\` and newline; label values also `"`.
fn escape_into(out: &mut String, s: &str, quote: bool) {
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '"' if quote => out.push_str("\\\""),
            c => out.push(c),
        }
    }
}

fn push_value(out: &mut String, v: f64) {
    if v.is_nan() {
        out.push_str("NaN");
    } else if v.is_infinite() {
        out.push_str(if v > 0.0 { "+Inf" } else { "-Inf" });
    } else if v.fract() == 0.0 && v.abs() < 1e15 {
        // Integers as integers: counters read 1234, not 1234.0 or 1.234e3.
        let _ = write!(out, "{}", v as i64);
    } else {
        let _ = write!(out, "{v}");
    }
}

fn valid_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

fn valid_label(name: &str) -> bool {
    valid_name(name) && !name.contains(':') && !name.starts_with("__")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn families_have_help_type_and_their_samples_together() {
        let mut e = Exposition::new();
        e.family("warren_peers", Kind::Gauge, "Peers by path.")
            .sample(&[("path", "direct")], 2.0)
            .sample(&[("path", "relay")], 0.0);
        e.single("warren_forwarded_total", Kind::Counter, "Forwarded.", 12345678.0);
        assert_eq!(
            e.finish(),
            "# HELP warren_peers Peers by path.\n# TYPE warren_peers gauge\n\
             warren_peers{path=\"direct\"} 2\nwarren_peers{path=\"relay\"} 0\n\
             # HELP warren_forwarded_total Forwarded.\n# TYPE warren_forwarded_total counter\n\
             warren_forwarded_total 12345678\n"
        );
    }

    #[test]
    fn label_values_and_help_are_escaped() {
        let mut e = Exposition::new();
        e.family("warren_x", Kind::Gauge, "a \\ b\nc \"q\"")
            .sample(&[("peer", "we\"ird\\name\nx"), ("key", "abc")], 1.0);
        let text = e.finish();
        assert!(text.starts_with("# HELP warren_x a \\\\ b\\nc \"q\"\n"), "{text}");
        assert!(
            text.contains("warren_x{peer=\"we\\\"ird\\\\name\\nx\",key=\"abc\"} 1\n"),
            "{text}"
        );
        assert_eq!(
            text.lines().count(),
            3,
            "a newline in a value never breaks a line"
        );
    }

    #[test]
    fn values_are_written_as_prometheus_reads_them() {
        let mut s = String::new();
        for v in [0.0, 1.5, -3.0, f64::NAN, f64::INFINITY, f64::NEG_INFINITY, 1e20] {
            push_value(&mut s, v);
            s.push(' ');
        }
        assert_eq!(s, "0 1.5 -3 NaN +Inf -Inf 100000000000000000000 ");
    }

    #[test]
    fn names_are_checked() {
        assert!(valid_name("warren_agent_peers"));
        assert!(!valid_name("9lives"));
        assert!(!valid_name("with-dash"));
        assert!(!valid_label("__reserved"));
    }
}
