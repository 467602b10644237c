//! `redirect-agent explain`: the tables istio-iptables (or, `--mode ambient`, istio-cni in the
//! pod) would write for the same flags (mangle, nat, raw), and which counter slot (and program)
//! implements each line.
//!
//! The text is valid `iptables-restore` input: the differential tests load it into a twin
//! namespace and hold the agent to what the kernel does with it.

use std::fmt::Write as _;

use redirect_common::{
    addr::Family,
    chain::{self, TableLine, TooManyRules},
    config::CaptureConfig,
};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ExplainedLine {
    /// `mangle`, `nat` or `raw`.
    pub table: String,
    pub line: String,
    pub chain: String,
    /// 1-based position in its chain, as `iptables -L --line-numbers` and `stats`.
    pub num: usize,
    /// Counter slot (`stats`' `slot`); `None` for jumps, targets and the lines no rule walk
    /// implements.
    pub slot: Option<usize>,
    pub by: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Explanation {
    /// `ipv4` (iptables) or `ipv6` (ip6tables).
    pub family: String,
    /// iptables-save (or ip6tables-save) text of every table the flags need: valid
    /// iptables-restore (ip6tables-restore) input. The field keeps its name for both families.
    pub iptables_save: String,
    pub lines: Vec<ExplainedLine>,
    /// `--mode ambient`: istio-cni's in-pod rules rather than istio-iptables'.
    #[serde(default)]
    pub ambient: bool,
    /// Ambient mode: what istio-cni writes in the node's own namespace for the pod (not
    /// iptables-restore input for the pod's), and what serves it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<NodeLine>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct NodeLine {
    pub line: String,
    pub by: String,
}

impl Explanation {
    /// The tables of `family`: iptables' for IPv4, ip6tables' for IPv6 (which istio-iptables
    /// installs for a pod with an IPv6 address, and the agent evaluates while it has one).
    pub fn new(cfg: &CaptureConfig, family: Family) -> Result<Self, TooManyRules> {
        let rules = chain::compile(cfg)?;
        let lines = chain::tables(cfg, &rules, family);
        Ok(Self {
            family: family.name().into(),
            iptables_save: chain::iptables_save(&lines),
            lines: lines.iter().map(explained).collect(),
            ambient: cfg.ambient.is_some(),
            node: cfg.ambient.as_ref().map(|a| {
                let (line, by) = chain::node_rule(a, family);
                NodeLine { line, by: by.into() }
            }),
        })
    }

    /// The iptables-save text, then the slot table as comments (which iptables-restore skips),
    /// so the whole output can be piped to it.
    pub fn render_text(&self) -> String {
        let tool = if self.family == Family::V6.name() {
            "ip6tables"
        } else {
            "iptables"
        };
        let by = match self.ambient {
            true => "istio-cni in an ambient pod's namespace",
            false => "istio-iptables",
        };
        let mut s = format!("# tables ({tool}) written by {by} for these flags (redirect-agent explain)\n");
        s.push_str(&self.iptables_save);
        let _ = writeln!(s, "#");
        let _ = writeln!(
            s,
            "# what implements each line ('slot' is the counter `redirect-agent stats` shows):"
        );
        let _ = writeln!(s, "# {:>4}  {:<28} line", "slot", "table:chain:num");
        for l in &self.lines {
            let slot = l.slot.map_or_else(|| "-".to_string(), |s| s.to_string());
            let at = format!("{}:{}:{}", l.table, l.chain, l.num);
            let _ = writeln!(s, "# {slot:>4}  {at:<28} {}  [{}]", l.line, l.by);
        }
        if let Some(node) = &self.node {
            let _ = writeln!(s, "#");
            let _ = writeln!(s, "# and in the node's own namespace, for every ambient pod:");
            let _ = writeln!(s, "#   {}  [{}]", node.line, node.by);
        }
        s
    }
}

fn explained(l: &TableLine) -> ExplainedLine {
    ExplainedLine {
        table: l.table.name().into(),
        line: l.text.clone(),
        chain: l.chain().into(),
        num: l.num,
        slot: l.slot,
        by: l.by.into(),
    }
}
