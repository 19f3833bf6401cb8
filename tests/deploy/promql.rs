//! A PromQL scanner: which metrics an expression selects, which labels it matches on or groups
//! by, checked against the catalogue of metrics keygate exports (`keygate::metrics::CATALOGUE`).

use keygate::metrics::{MetricKind, CATALOGUE};
use std::collections::BTreeSet;

/// Labels Prometheus adds to every scraped series.
pub const TARGET_LABELS: &[&str] = &["job", "instance"];
/// Values of the labels with a closed set.
const LABEL_VALUES: &[(&str, &[&str])] = &[
    ("state", &["ready", "cooling", "disabled"]),
    ("kind", &["prompt", "completion"]),
    (
        "outcome",
        &[
            "success",
            "rate_limited",
            "key_refused",
            "server_error",
            "client_error",
            "connect_error",
            "timeout",
        ],
    ),
];
const FUNCTIONS: &[&str] = &[
    "sum",
    "avg",
    "min",
    "max",
    "count",
    "topk",
    "bottomk",
    "rate",
    "irate",
    "increase",
    "delta",
    "histogram_quantile",
    "vector",
    "clamp_min",
    "clamp_max",
    "abs",
    "round",
    "absent",
    "label_replace",
    "max_over_time",
    "min_over_time",
    "avg_over_time",
];
const GROUPING: &[&str] = &[
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
];
const OPERATORS: &[&str] = &["and", "or", "unless", "bool", "offset"];

/// What an expression selects: metric names, with the labels it matches on or groups by.
#[derive(Debug, Default)]
pub struct Uses {
    /// Series names, in order of appearance.
    pub metrics: Vec<String>,
    /// `(metric, label, op, value)` from selectors.
    pub matchers: Vec<(String, String, String, String)>,
    /// Labels of `by`, `without`, `on` and `ignoring` clauses.
    pub grouping: Vec<String>,
}

fn ident_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_' || c == ':'
}

/// A cursor over an expression that reports running off its end as an error.
struct Scan<'a> {
    chars: Vec<char>,
    i: usize,
    expr: &'a str,
}

impl Scan<'_> {
    fn peek(&self) -> Option<char> {
        self.chars.get(self.i).copied()
    }

    fn at(&self) -> Result<char, String> {
        self.peek()
            .ok_or_else(|| format!("unexpected end of {}", self.expr))
    }

    fn skip_space(&mut self) {
        while self.peek().is_some_and(char::is_whitespace) {
            self.i += 1;
        }
    }

    fn take_while(&mut self, f: impl Fn(char) -> bool) -> String {
        let start = self.i;
        while self.peek().is_some_and(&f) {
            self.i += 1;
        }
        self.chars[start..self.i].iter().collect()
    }

    /// Skips a quoted string starting at the quote; returns its content.
    fn string(&mut self) -> Result<String, String> {
        let quote = self.at()?;
        self.i += 1;
        let mut value = String::new();
        loop {
            match self.at()? {
                c if c == quote => break,
                '\\' => {
                    self.i += 1;
                    value.push(self.at()?);
                }
                c => value.push(c),
            }
            self.i += 1;
        }
        self.i += 1;
        Ok(value)
    }

    /// Parses `label op "value", ...` after a `{`, up to and including the `}`.
    fn matchers(&mut self, metric: &str, uses: &mut Uses) -> Result<(), String> {
        let expr = self.expr;
        loop {
            while self.peek().is_some_and(|c| c.is_whitespace() || c == ',') {
                self.i += 1;
            }
            if self.at()? == '}' {
                self.i += 1;
                return Ok(());
            }
            let label = self.take_while(ident_char);
            if label.is_empty() {
                return Err(format!("bad matcher in {expr}"));
            }
            self.skip_space();
            let op = self.take_while(|c| matches!(c, '=' | '!' | '~'));
            if !["=", "!=", "=~", "!~"].contains(&op.as_str()) {
                return Err(format!("bad operator {op:?} in {expr}"));
            }
            self.skip_space();
            if !matches!(self.at()?, '"' | '\'') {
                return Err(format!("unquoted value in {expr}"));
            }
            let value = self.string()?;
            uses.matchers.push((metric.to_string(), label, op, value));
        }
    }
}

/// What `expr` selects, or why it cannot be read.
pub fn promql_uses(expr: &str) -> Result<Uses, String> {
    let mut sc = Scan {
        chars: expr.chars().collect(),
        i: 0,
        expr,
    };
    let mut uses = Uses::default();
    while let Some(c) = sc.peek() {
        if c == '"' || c == '\'' {
            sc.string()?;
        } else if c == '[' {
            // A range or subquery: `[5m]`, `[$__rate_interval]`.
            sc.take_while(|c| c != ']');
            sc.at()?;
            sc.i += 1;
        } else if c == '{' {
            sc.i += 1;
            sc.matchers("", &mut uses)?;
        } else if c == '$' || c.is_ascii_digit() || c == '.' {
            // A Grafana variable or a number (0.99, 1e3): skip it whole.
            sc.i += 1;
            sc.take_while(|c| ident_char(c) || c == '.');
        } else if ident_char(c) {
            let word = sc.take_while(ident_char);
            sc.skip_space();
            let next = sc.peek();
            if GROUPING.contains(&word.as_str()) {
                if next == Some('(') {
                    sc.i += 1;
                    let inner = sc.take_while(|c| c != ')');
                    sc.at()?;
                    sc.i += 1;
                    uses.grouping.extend(
                        inner
                            .split(',')
                            .map(|l| l.trim().to_string())
                            .filter(|l| !l.is_empty()),
                    );
                }
            } else if OPERATORS.contains(&word.as_str()) || FUNCTIONS.contains(&word.as_str()) {
                // `sum by (le) (...)`: an aggregation need not be followed by its `(`.
            } else if next == Some('(') {
                return Err(format!("unknown function {word} in {expr}"));
            } else {
                if next == Some('{') {
                    sc.i += 1;
                    sc.matchers(&word, &mut uses)?;
                }
                uses.metrics.push(word);
            }
        } else {
            sc.i += 1;
        }
    }
    Ok(uses)
}

/// The labels of a series name (`keygate_ttfb_seconds_bucket` → upstream, le), or `None` when
/// keygate does not export it.
pub fn series_labels(name: &str) -> Option<Vec<&'static str>> {
    CATALOGUE.iter().find_map(|metric| {
        let mut labels = metric.labels.to_vec();
        if metric.kind != MetricKind::Histogram {
            return (name == metric.name).then_some(labels);
        }
        match name.strip_prefix(metric.name)? {
            "_bucket" => {
                labels.push("le");
                Some(labels)
            }
            "_sum" | "_count" => Some(labels),
            _ => None,
        }
    })
}

/// Checks an expression against what keygate exports; `extra` names other allowed series.
pub fn check_promql(expr: &str, extra: &[&str]) -> Result<Uses, String> {
    let uses = promql_uses(expr)?;
    if uses.metrics.is_empty() {
        return Err(format!("no metric in {expr}"));
    }
    let mut labels: BTreeSet<&str> = TARGET_LABELS.iter().copied().collect();
    for m in &uses.metrics {
        if extra.contains(&m.as_str()) {
            continue;
        }
        let own = series_labels(m).ok_or_else(|| format!("{m} is not a keygate metric: {expr}"))?;
        labels.extend(own);
    }
    for l in &uses.grouping {
        if !labels.contains(l.as_str()) {
            return Err(format!("no label {l:?} here: {expr}"));
        }
    }
    for (metric, label, op, value) in &uses.matchers {
        if !labels.contains(label.as_str()) {
            return Err(format!("{metric} has no label {label:?}: {expr}"));
        }
        let closed = LABEL_VALUES.iter().find(|(l, _)| l == label);
        if let (true, Some((_, values))) = (op == "=" || op == "!=", closed) {
            if !values.contains(&value.as_str()) {
                return Err(format!("{label}={value:?} never occurs: {expr}"));
            }
        }
    }
    Ok(uses)
}

#[test]
fn promql_scanner_sees_metrics_labels_and_mistakes() {
    let uses = promql_uses(
        r#"histogram_quantile(0.99, sum by (le, upstream) (rate(keygate_ttfb_seconds_bucket{job=~"$job"}[5m]))) > 10"#,
    )
    .unwrap();
    assert_eq!(uses.metrics, ["keygate_ttfb_seconds_bucket"]);
    assert_eq!(uses.grouping, ["le", "upstream"]);
    assert_eq!(uses.matchers[0].1, "job");
    check_promql(r#"sum(keygate_keys{state!="disabled"}) or vector(0)"#, &[]).unwrap();
    check_promql(
        r#"sum by (route) (rate(keygate_request_duration_seconds_count[5m]))"#,
        &[],
    )
    .unwrap();
    for bad in [
        r#"rate(process_cpu_seconds_total[5m])"#,
        r#"sum(keygate_keys{state="disable"})"#,
        r#"sum by (model) (keygate_keys)"#,
        r#"rat(keygate_keys[5m])"#,
        r#"keygate_ttfb_seconds"#,
        r#"keygate_requests_total_bucket"#,
        r#"sum by (le) (keygate_ttfb_seconds_sum)"#,
        r#"sum(keygate_keys{state="ready"#,
    ] {
        assert!(check_promql(bad, &[]).is_err(), "not caught: {bad}");
    }
}
