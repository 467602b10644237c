//! docs/reliability.md's generated sections, from `redirect-testkit stress`'s report.

use anyhow::Context as _;
use serde_json::Value;

/// The target: after a burst, within 20 % of the idle size.
pub const MAX_RATIO: f64 = 1.2;

pub struct Context<'a> {
    pub profile: &'a str,
    /// /proc/loadavg's first three fields when the run began.
    pub load: String,
}

fn n(v: &Value, k: &str) -> anyhow::Result<u64> {
    v[k].as_u64().with_context(|| format!("stress: no {k} in the report"))
}

fn mib(kib: u64) -> String {
    format!("{:.1}", kib as f64 / 1024.0)
}

/// Connections per second, as a whole number.
fn rate(count: u64, secs: f64) -> String {
    format!("{:.0}", count as f64 / secs.max(0.001))
}

/// `ok` and each failure kind that happened, as "1000 served, 3 refused".
fn outcomes(o: &Value) -> String {
    let mut parts = vec![format!("{} served", o["ok"].as_u64().unwrap_or(0))];
    for (k, label) in [
        ("refused", "refused"),
        ("reset", "reset"),
        ("cut", "cut short"),
        ("timed_out", "timed out"),
        ("other", "other errors"),
    ] {
        let v = o[k].as_u64().unwrap_or(0);
        if v > 0 {
            parts.push(format!("{v} {label}"));
        }
    }
    parts.join(", ")
}

/// "proxied / direct" as the servers counted them (direct: around the proxy).
fn tally(t: &Value) -> String {
    let other = t["other"].as_u64().unwrap_or(0);
    let s = format!(
        "{} / {}",
        t["proxied"].as_u64().unwrap_or(0),
        t["direct"].as_u64().unwrap_or(0)
    );
    if other > 0 {
        format!("{s} (+{other} from elsewhere)")
    } else {
        s
    }
}

/// The maps' entries as "ORIG_BY_COOKIE 0, …", in the report's order.
fn maps(m: &Value) -> String {
    m.as_object()
        .map(|o| {
            o.iter()
                .map(|(k, v)| format!("{k} {}", v.as_u64().unwrap_or(0)))
                .collect::<Vec<_>>()
                .join(", ")
        })
        .unwrap_or_default()
}

fn problems(v: &Value) -> String {
    let p: Vec<&str> = v["problems"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .collect();
    if p.is_empty() { "none".to_owned() } else { p.join("; ") }
}

/// Each section's key (its markers' `stress:KEY`) and text.
pub fn blocks(r: &Value, cx: &Context<'_>) -> anyhow::Result<Vec<(&'static str, String)>> {
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let errors: Vec<&str> = r["errors"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .collect();
    let mut out = vec![(
        "run",
        format!(
            "Measured {} on Linux {} with {cpus} CPUs (load average {} when the run began), \
             against the {} build, in {:.0} s. The machine is shared: other sessions build and \
             test on it at the same time, so rates and times are what this run saw on a busy \
             machine, not the agent's limits. Routines that could not run: {}.\n",
            crate::docs::today(),
            kernel.trim(),
            cx.load,
            cx.profile,
            r["seconds"].as_f64().unwrap_or(0.0),
            if errors.is_empty() {
                "none".to_owned()
            } else {
                errors.join("; ")
            },
        ),
    )];
    if let Some(m) = r.get("memory").filter(|m| !m.is_null()) {
        out.push(("memory", memory(m, cx)?));
    }
    if let Some(h) = r.get("hold").filter(|h| !h.is_null()) {
        out.push(("hold", hold(h)?));
    }
    out.push(("churn", churn(r)?));
    out.push(("outage", outage(r)?));
    Ok(out)
}

fn memory(r: &Value, cx: &Context<'_>) -> anyhow::Result<String> {
    let idle = n(r, "idle_kib")?;
    let mut s = format!(
        "Bursts of {} concurrent proxied connections (each sends {} KiB and reads them back; all \
         are held until every one has, then all close), against `redirect-agent run` ({} \
         build). Resident memory (VmRSS) of the agent, idle before the first burst: {} MiB ({} \
         MiB heap and other anonymous memory, {} MiB of mapped files). After a burst: once its \
         descriptors are back to the idle count and two readings half a second apart agree (at \
         least 2 s, at most 10 s).\n\n\
         | burst | peak (MiB) | after (MiB) | after / idle | anonymous after (MiB) | seconds |\n\
         |---:|---:|---:|---:|---:|---:|\n",
        n(r, "connections")?,
        n(r, "bytes")? / 1024,
        cx.profile,
        mib(idle),
        mib(n(r, "idle_anon_kib")?),
        mib(n(r, "idle_file_kib")?),
    );
    let mut worst = 0f64;
    for (i, b) in r["bursts"].as_array().context("stress: no bursts")?.iter().enumerate() {
        let after = n(b, "after_kib")?;
        let ratio = after as f64 / idle.max(1) as f64;
        worst = worst.max(ratio);
        s.push_str(&format!(
            "| {} | {} | {} | {ratio:.2} | {} | {:.1} |\n",
            i + 1,
            mib(n(b, "peak_kib")?),
            mib(after),
            mib(n(b, "after_anon_kib")?),
            b["seconds"].as_f64().unwrap_or(0.0),
        ));
    }
    s.push_str(&format!(
        "\nWorst after / idle: {worst:.2} (the target: at most {MAX_RATIO}).\n"
    ));
    Ok(s)
}

fn hold(h: &Value) -> anyhow::Result<String> {
    let (asked, held) = (n(h, "asked")?, n(h, "connections")?);
    let capped = if held < asked {
        format!(
            " ({asked} asked for: RLIMIT_NOFILE's hard limit here is {} and the agent and the test \
             process lack CAP_SYS_RESOURCE to raise it, so each can hold both ends of at most \
             that many, after its reserve)",
            n(h, "nofile")?
        )
    } else {
        String::new()
    };
    Ok(format!(
        "{held} connections{capped} from the remote host to the app, through sk_lookup and the \
         proxy of one `redirect-agent run`, all open at once: each sends a request and reads its \
         echo, all are held {} s, then each does it again and closes.\n\n\
         | | value |\n|---|---|\n\
         | all open (first answer on each) after | {:.1} s |\n\
         | failed | {} |\n\
         | at the app: through the proxy / around it | {} |\n\
         | agent's descriptors: idle, held, after | {}, {}, {} |\n\
         | agent's resident memory: idle, held | {} MiB, {} MiB |\n\
         | maps idle | {} |\n\
         | maps held | {} |\n\
         | maps after | {} |\n\
         | problems | {} |\n",
        n(h, "held_secs")?,
        h["open_secs"].as_f64().unwrap_or(0.0),
        n(h, "failed")?,
        tally(&h["app"]),
        n(h, "idle_fds")?,
        n(h, "held_fds")?,
        n(h, "after_fds")?,
        mib(n(h, "idle_kib")?),
        mib(n(h, "held_kib")?),
        maps(&h["idle_maps"]),
        maps(&h["held_maps"]),
        maps(&h["after_maps"]),
        problems(h),
    ))
}

fn churn(r: &Value) -> anyhow::Result<String> {
    let runs = r["churn"].as_array().context("stress: no churn")?;
    let Some(first) = runs.first() else {
        return Ok("Not run.\n".to_owned());
    };
    let mut s = format!(
        "{} short connections per mode, half from the workload to the remote host and half from \
         the remote host to the app, at once, {} at a time each way (a 32-byte request, its echo, \
         the server closes first). \"Through / around\" is what the servers counted: peers that \
         were the proxy, and peers that reached them around it. Descriptors are the agent's; the \
         maps are the pinned per-connection maps, idle before and after the load.\n\n\
         | mode | seconds | connections/s | outbound | inbound | remote host: through / around | app: through / around | descriptors idle, peak, after | maps peak | maps after (idle) | problems |\n\
         |---|---:|---:|---|---|---|---|---|---|---|---|\n",
        n(first, "connections")?,
        n(first, "concurrency")?,
    );
    for c in runs {
        let secs = c["seconds"].as_f64().unwrap_or(0.0);
        let total = c["outbound"]["ok"].as_u64().unwrap_or(0) + c["inbound"]["ok"].as_u64().unwrap_or(0);
        s.push_str(&format!(
            "| {} | {secs:.1} | {} | {} | {} | {} | {} | {}, {}, {} | {} | {} ({}) | {} |\n",
            c["mode"].as_str().unwrap_or("?"),
            rate(total, secs),
            outcomes(&c["outbound"]),
            outcomes(&c["inbound"]),
            tally(&c["remote"]),
            tally(&c["app"]),
            n(c, "idle_fds")?,
            n(c, "peak_fds")?,
            n(c, "after_fds")?,
            maps(&c["peak_maps"]),
            maps(&c["after_maps"]),
            maps(&c["idle_maps"]),
            problems(c),
        ));
    }
    Ok(s)
}

fn outage(r: &Value) -> anyhow::Result<String> {
    let runs = r["outages"].as_array().context("stress: no outages")?;
    let Some(first) = runs.first() else {
        return Ok("Not run.\n".to_owned());
    };
    let mut s = format!(
        "Connections churn both ways ({} at a time each way, each bounded by 4 s) while the \
         agent is SIGKILLed or SIGSTOPped for the time shown, then started again (`run`: a new \
         process of the same name takes the pinned links over; `node`: a new process adopts the \
         pins and the workload) or sent SIGCONT. Outcomes are by the 10 ms each connection \
         ended in. \"Around\" counts connections that reached the remote host or the app around \
         the proxy: it must be 0. Recovery: from starting the new process (or SIGCONT) to the \
         first connection served, outbound / inbound (to 10 ms), with the new process's start \
         time.\n\n\
         | mode | signal | down (s) | during: outbound | during: inbound | remote host / app: through, around (whole run) | restart (ms) | recovery (ms) | after: outbound | after: inbound | descriptors idle, after | maps after (idle) | problems |\n\
         |---|---|---:|---|---|---|---:|---|---|---|---|---|---|\n",
        n(first, "concurrency")?,
    );
    for o in runs {
        let ph = |k: &str| &o[k];
        let around = |srv: &str| {
            ["before", "during", "after"]
                .iter()
                .map(|p| o[*p][srv]["direct"].as_u64().unwrap_or(0) + o[*p][srv]["other"].as_u64().unwrap_or(0))
                .sum::<u64>()
        };
        let through = |srv: &str| {
            ["before", "during", "after"]
                .iter()
                .map(|p| o[*p][srv]["proxied"].as_u64().unwrap_or(0))
                .sum::<u64>()
        };
        let ms = |k: &str| o[k].as_u64().map_or_else(|| "none".to_owned(), |v| v.to_string());
        s.push_str(&format!(
            "| {} | {} | {:.1} | {} | {} | {}, {} / {}, {} | {} | {} / {} | {} | {} | {}, {} | {} ({}) | {} |\n",
            o["mode"].as_str().unwrap_or("?"),
            o["signal"].as_str().unwrap_or("?"),
            ph("during")["seconds"].as_f64().unwrap_or(0.0),
            outcomes(&ph("during")["outbound"]),
            outcomes(&ph("during")["inbound"]),
            through("remote"),
            around("remote"),
            through("app"),
            around("app"),
            n(o, "restart_ms")?,
            ms("recovery_ms_outbound"),
            ms("recovery_ms_inbound"),
            outcomes(&ph("after")["outbound"]),
            outcomes(&ph("after")["inbound"]),
            n(o, "idle_fds")?,
            n(o, "after_fds")?,
            maps(&o["after_maps"]),
            maps(&o["idle_maps"]),
            problems(o),
        ));
    }
    Ok(s)
}
