//! Entries of the pinned maps that hold per-connection state, read with aya from the pins the
//! agent keeps under `/sys/fs/bpf/redirect/NAME/`: what must come back to its idle value once
//! connections have ended.

use std::{collections::BTreeMap, path::Path, time::Duration};

use anyhow::Context as _;
use aya::maps::{HashMap, Map, MapData};
use redirect_common::{OrigDst, PendingOrigDst, TupleKey, maps};

/// The maps counted, by name. (`AGENT_SOCKETS` is socket-local storage, which the kernel frees
/// with each socket and does not enumerate: the agent's descriptors, counted beside these, say
/// whether its sockets came back.)
pub const COUNTED: [&str; 3] = [maps::ORIG_BY_COOKIE, maps::ORIG_BY_TUPLE, maps::INBOUND_PENDING];

/// Entries per map of [`COUNTED`].
pub type Counts = BTreeMap<String, u64>;

fn count<K: aya::Pod, V: aya::Pod>(dir: &Path, map: &str) -> anyhow::Result<u64> {
    let path = dir.join(map);
    let data = MapData::from_pin(&path).with_context(|| format!("opening the pinned map {}", path.display()))?;
    let map: HashMap<MapData, K, V> = HashMap::try_from(Map::from_map_data(data)?)?;
    Ok(map.keys().filter(Result::is_ok).count() as u64)
}

/// Entries of each map of [`COUNTED`] for the instance `name`, now.
pub fn counts(name: &str) -> anyhow::Result<Counts> {
    let dir = Path::new("/sys/fs/bpf/redirect").join(name);
    Ok(Counts::from([
        (
            maps::ORIG_BY_COOKIE.to_owned(),
            count::<u64, PendingOrigDst>(&dir, maps::ORIG_BY_COOKIE)?,
        ),
        (
            maps::ORIG_BY_TUPLE.to_owned(),
            count::<TupleKey, OrigDst>(&dir, maps::ORIG_BY_TUPLE)?,
        ),
        (
            maps::INBOUND_PENDING.to_owned(),
            count::<TupleKey, OrigDst>(&dir, maps::INBOUND_PENDING)?,
        ),
    ]))
}

/// How long `map` may take to come back: `within`, and for `INBOUND_PENDING` at least as long
/// as the agent keeps a record nothing took (a segment without a handshake leaves one, which
/// its sweep removes: `redirect_agent::engine::pending`).
fn bound(map: &str, within: Duration) -> Duration {
    if map == maps::INBOUND_PENDING {
        within.max(redirect_agent::engine::pending::UNTAKEN_AT_MOST + Duration::from_secs(5))
    } else {
        within
    }
}

/// Waits (bounded by `within`, see [`bound`]) until every map holds at most its `idle` count;
/// returns the counts then, and a problem for each map above its idle value.
pub fn back_to_idle(name: &str, idle: &Counts, within: Duration) -> anyhow::Result<(Counts, Vec<String>)> {
    let start = std::time::Instant::now();
    loop {
        let now = counts(name)?;
        let over: Vec<(&String, u64)> = now
            .iter()
            .filter(|(m, n)| **n > idle.get(*m).copied().unwrap_or(0))
            .map(|(m, n)| (m, *n))
            .collect();
        let waited = start.elapsed();
        if over.iter().all(|(m, _)| waited > bound(m, within)) {
            let problems = over
                .iter()
                .map(|(m, n)| {
                    format!(
                        "{m} holds {n} entries, {} when idle ({} s after the load ended)",
                        idle.get(*m).copied().unwrap_or(0),
                        bound(m, within).as_secs()
                    )
                })
                .collect();
            return Ok((now, problems));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}
