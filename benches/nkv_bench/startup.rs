//! Start-up: spawn nkv-server on a data directory of N keys and time until its socket accepts
//! and until it answers; beside it, the time to read_dir and read those same files.

use std::collections::BTreeMap;
use std::path::PathBuf;

use crate::floors;
use crate::kv;
use crate::results::Results;
use crate::servers::{tree_size, Base, Env};
use crate::wire::Dialect;

/// Keys of the start-up data sets: `bench.s.<i>`, 100-byte values.
pub const DATASET_PREFIX: &str = "bench.s.";

/// Data directories holding N keys, written through nkv itself (so in its own format) and
/// reused by every round.
#[derive(Default)]
pub struct Datasets {
    dirs: BTreeMap<usize, PathBuf>,
}

impl Datasets {
    /// Takes a directory that a stopped server left holding `n` dataset keys.
    pub fn adopt(&mut self, n: usize, dir: PathBuf) {
        self.dirs.insert(n, dir);
    }

    /// The directory holding `n` keys, written now if there is none yet.
    pub fn ensure(&mut self, env: &Env, n: usize, res: &mut Results) -> Result<PathBuf, String> {
        if let Some(d) = self.dirs.get(&n) {
            return Ok(d.clone());
        }
        eprintln!("nkv_bench: writing {n} keys for the start-up data set");
        let dir = env.fresh_dir(Base::Disk, &format!("dataset{n}"))?;
        let mut server = env.start_nkv(&format!("dataset{n}"), &dir)?;
        server.populate(DATASET_PREFIX, n, &kv::value(Dialect::Nkv, 100))?;
        crate::stop(&mut server, res);
        self.dirs.insert(n, dir.clone());
        Ok(dir)
    }
}

/// One round: start the server on the N-key data set (checking it loaded N keys), stop it,
/// and read the files; `floor_first` alternates the order between rounds.
pub fn measure(
    env: &Env,
    datasets: &mut Datasets,
    n: usize,
    floor_first: bool,
    res: &mut Results,
) -> Result<(), String> {
    let dir = datasets.ensure(env, n, res)?;
    nix::unistd::sync();
    let floor = |res: &mut Results| -> Result<(), String> {
        let (took, files) =
            floors::read_tree(&dir).map_err(|e| format!("reading {}: {e}", dir.display()))?;
        res.add(
            &format!("startup/floor/k{n}"),
            &[
                ("read_ms", took.as_secs_f64() * 1e3),
                ("files", files as f64),
            ],
        );
        Ok(())
    };
    if floor_first {
        floor(res)?;
    }
    let mut server = env.start_nkv(&format!("startup{n}"), &dir)?;
    let ready = server.ready;
    let loaded = server.stats_keys()?;
    if loaded != n as u64 {
        res.note(format!(
            "after a restart on a data dir written with {n} keys, STATS reports {loaded} keys"
        ));
    }
    let st = server.proc.status()?;
    let stop_ms = crate::stop(&mut server, res).map_or(f64::NAN, |d| d.as_secs_f64() * 1e3);
    let mut metrics = vec![
        ("connect_ms", ready.connect.as_secs_f64() * 1e3),
        ("reply_ms", ready.reply.as_secs_f64() * 1e3),
        ("rss_kib", st.rss_kib as f64),
        ("threads", st.threads as f64),
    ];
    if stop_ms.is_finite() {
        metrics.push(("stop_ms", stop_ms));
    }
    res.add(&format!("startup/nkv/k{n}"), &metrics);
    if !floor_first {
        floor(res)?;
    }
    if !res.info.iter().any(|(k, _)| k == &format!("data set {n}")) {
        let (files, bytes) = tree_size(&dir);
        res.info(
            &format!("data set {n}"),
            format!("{files} files, {:.1} MiB", bytes as f64 / 1048576.0),
        );
    }
    Ok(())
}
