//! Collected figures: every measurement ("cell") keeps its per-round figures; the report uses
//! their medians. Cell keys name what was measured: `get/nkv/c8/v100`, `notify/redis/s300`, ...

use std::collections::BTreeMap;

use serde_json::{json, Map, Value};

use crate::loadgen::median;

#[derive(Default)]
pub struct Results {
    cells: BTreeMap<String, Vec<BTreeMap<String, f64>>>,
    /// Facts about the machine and the run, in the order they are shown.
    pub info: Vec<(String, String)>,
    /// Observations worth a reader's attention (server misbehaviour, skipped parts).
    pub notes: Vec<String>,
}

impl Results {
    /// Records one round's figures for `key`.
    pub fn add(&mut self, key: &str, metrics: &[(&str, f64)]) {
        let round = metrics.iter().map(|(k, v)| (k.to_string(), *v)).collect();
        self.cells.entry(key.to_string()).or_default().push(round);
    }

    /// The median over rounds of `metric` of `key`.
    pub fn get(&self, key: &str, metric: &str) -> Option<f64> {
        let mut v: Vec<f64> = self
            .cells
            .get(key)?
            .iter()
            .filter_map(|r| r.get(metric).copied())
            .collect();
        median(&mut v)
    }

    /// Whether any cell's key starts with `prefix`.
    pub fn get_any(&self, prefix: &str) -> bool {
        self.cells.keys().any(|k| k.starts_with(prefix))
    }

    pub fn info(&mut self, key: &str, value: impl Into<String>) {
        self.info.push((key.to_string(), value.into()));
    }

    /// Adds an observation once, however often it is made.
    pub fn note(&mut self, text: impl Into<String>) {
        let text = text.into();
        if !self.notes.contains(&text) {
            eprintln!("nkv_bench: note: {text}");
            self.notes.push(text);
        }
    }

    pub fn to_json(&self, targets: Value) -> Value {
        let mut cells = Map::new();
        for (key, rounds) in &self.cells {
            let mut medians = Map::new();
            if let Some(first) = rounds.first() {
                for metric in first.keys() {
                    if let Some(m) = self.get(key, metric) {
                        medians.insert(metric.clone(), json!(m));
                    }
                }
            }
            cells.insert(key.clone(), json!({ "median": medians, "rounds": rounds }));
        }
        let info: Map<String, Value> = self
            .info
            .iter()
            .map(|(k, v)| (k.clone(), json!(v)))
            .collect();
        json!({ "info": info, "cells": cells, "targets": targets, "notes": self.notes })
    }
}

/// A Markdown table.
pub struct Table {
    pub title: String,
    pub header: Vec<String>,
    pub rows: Vec<Vec<String>>,
    pub footer: Option<String>,
}

impl Table {
    pub fn new(title: impl Into<String>, header: &[&str]) -> Table {
        Table {
            title: title.into(),
            header: header.iter().map(|s| s.to_string()).collect(),
            rows: Vec::new(),
            footer: None,
        }
    }

    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    pub fn markdown(&self) -> String {
        let mut out = format!("### {}\n\n| {} |\n|", self.title, self.header.join(" | "));
        for (i, _) in self.header.iter().enumerate() {
            out.push_str(if i == 0 { "---|" } else { "---:|" });
        }
        out.push('\n');
        for r in &self.rows {
            out.push_str(&format!("| {} |\n", r.join(" | ")));
        }
        if let Some(f) = &self.footer {
            out.push_str(&format!("\n{f}\n"));
        }
        out
    }
}

const DASH: &str = "–";

/// ops/s with thousands separators.
pub fn ops(v: Option<f64>) -> String {
    let Some(v) = v else { return DASH.into() };
    let n = v.round() as u64;
    let s = n.to_string();
    let mut out = String::new();
    for (i, ch) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(ch);
    }
    out
}

/// Microseconds (or milliseconds): one decimal under 100, none above.
pub fn num(v: Option<f64>) -> String {
    match v {
        None => DASH.into(),
        Some(v) if v.abs() < 100.0 => format!("{v:.1}"),
        Some(v) => format!("{v:.0}"),
    }
}

pub fn ratio(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => Some(a / b),
        _ => None,
    }
}

pub fn times(r: Option<f64>) -> String {
    r.map_or(DASH.into(), |r| format!("{r:.2}×"))
}

pub fn mib(kib: Option<f64>) -> String {
    kib.map_or(DASH.into(), |k| format!("{:.2} MiB", k / 1024.0))
}

pub fn size_label(bytes: usize) -> String {
    if bytes >= 1024 && bytes.is_multiple_of(1024) {
        format!("{} KiB", bytes / 1024)
    } else {
        format!("{bytes} B")
    }
}
