//! `dump` and `restore`: every key as one JSON line, and back.

use std::collections::BTreeMap;
use std::io::{self, BufRead, Write};

use serde_json::value::RawValue;

use nkv::wire::Dumped;
use nkv::Client;

use crate::{Context, Failure, Outcome};

/// Prints `{"key":..,"value":..}` for every key, or for PREFIX and the keys below it, sorted.
/// Two reads (the prefix itself, then below it), not one snapshot. A pattern (`*`, `a.*`)
/// dumps the keys it matches. Values are written as the exact text stored, so `restore`
/// puts back the same store.
pub fn dump(client: &mut Client, prefix: Option<&str>, _: &Context) -> Result<Outcome, Failure> {
    let mut entries: BTreeMap<String, Box<RawValue>> = BTreeMap::new();
    match prefix {
        None => entries = client.get_matching_raw("*")?,
        Some(pattern) if pattern.contains('*') => entries = client.get_matching_raw(pattern)?,
        Some(prefix) => {
            if let Some(entry) = client.get_raw(prefix)? {
                entries.insert(prefix.to_owned(), entry.value);
            }
            entries.extend(client.get_matching_raw(&format!("{prefix}.*"))?);
        }
    }
    let mut out = io::stdout().lock();
    for (key, value) in entries {
        let line = serde_json::to_string(&Dumped { key, value })
            .map_err(|e| Failure::Usage(e.to_string()))?;
        writeln!(out, "{line}")?;
    }
    out.flush()?;
    Ok(Outcome::Ok)
}

/// Puts every `dump` line read from standard input, in order; stops at the first line that
/// is not one or whose put fails, naming its line number. Blank lines are skipped.
pub fn restore(client: &mut Client, context: &Context) -> Result<Outcome, Failure> {
    if context.in_session {
        return Err(Failure::Usage(
            "restore: in a session standard input carries the commands; run `nkv-client restore < FILE`".into(),
        ));
    }
    let mut restored = 0;
    for (index, line) in io::stdin().lock().lines().enumerate() {
        let number = index + 1;
        let line = line.map_err(|e| Failure::Usage(format!("line {number}: cannot read: {e}")))?;
        if line.trim().is_empty() {
            continue;
        }
        let entry: Dumped<String, Box<RawValue>> = serde_json::from_str(&line).map_err(|e| {
            Failure::Usage(format!(
                "restore: line {number}: not a {{\"key\":..,\"value\":..}} line: {e}; {restored} keys restored before it"
            ))
        })?;
        client.put(&entry.key, &*entry.value).map_err(|e| {
            Failure::Usage(format!(
                "restore: line {number}: {}: {e}; {restored} keys restored before it",
                entry.key
            ))
        })?;
        restored += 1;
    }
    eprintln!("nkv-client: restored {restored} keys");
    Ok(Outcome::Ok)
}
