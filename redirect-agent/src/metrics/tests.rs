use super::*;

/// Two workloads, one with a pod, each with a proxy; one rule, events, one map.
fn snapshot() -> Snapshot {
    let proxy = || ProxySnapshot {
        active: 1,
        accepted: 4,
        forwarded: 3,
        no_original_dst: 0,
        upstream_failed: 1,
        over_limit: 0,
        over_budget: 0,
        bytes_to_upstream: 10,
        bytes_from_upstream: 20,
        spliced: 2,
    };
    let rule = RuleRow {
        family: "ipv4".into(),
        table: "nat".into(),
        chain: "ISTIO_OUTPUT".into(),
        rule: 1,
        slot: 0,
        match_: "-o lo".into(),
        target: "RETURN".into(),
        connections: 7,
        columns: None,
    };
    Snapshot {
        workloads: vec![
            WorkloadSnapshot {
                id: "a\"b".into(),
                pod: None,
                rules: Vec::new(),
                events: [("inbound_no_listener".to_owned(), 2)].into(),
                proxy: Some(proxy()),
            },
            WorkloadSnapshot {
                id: "c".into(),
                pod: Some(redirect_api::PodRef::new("default", "web\"0")),
                rules: vec![rule],
                events: [("inbound_no_listener".to_owned(), 5)].into(),
                proxy: Some(proxy()),
            },
        ],
        maps: vec![MapOccupancy {
            name: "WORKLOADS",
            entries: 1,
            max_entries: 64,
        }],
        budget: BudgetSnapshot {
            nofile: 1024,
            reserved: 600,
            connections: 212,
            active: 3,
        },
        uptime: Duration::from_millis(1500),
    }
}

#[test]
fn exposition_names_and_escapes() {
    let text = render(&snapshot());
    assert!(
        text.contains("redirect_events_total{workload=\"a\\\"b\",event=\"inbound_no_listener\"} 2\n"),
        "{text}"
    );
    // Without a pod, no pod labels; with one, they end every sample of the workload.
    assert!(
        text.contains("redirect_proxy_connections_total{workload=\"a\\\"b\"} 4\n"),
        "{text}"
    );
    let pod = r#"namespace="default",pod="web\"0""#;
    for sample in [
        format!(r#"redirect_events_total{{workload="c",event="inbound_no_listener",{pod}}} 5"#),
        format!(r#"redirect_proxy_connections_total{{workload="c",{pod}}} 4"#),
        format!(r#"redirect_proxy_bytes_total{{workload="c",direction="from_upstream",{pod}}} 20"#),
        format!(r#"redirect_proxy_spliced_directions_total{{workload="c",{pod}}} 2"#),
        format!(
            r#"redirect_rule_connections_total{{workload="c",family="ipv4",table="nat",chain="ISTIO_OUTPUT",rule="1",target="RETURN",match="-o lo",{pod}}} 7"#
        ),
    ] {
        assert!(text.contains(&format!("{sample}\n")), "{sample}\n{text}");
    }
    let pod_lines = text.lines().filter(|l| l.contains("namespace=")).count();
    let c_lines = text.lines().filter(|l| l.contains("workload=\"c\"")).count();
    assert_eq!(pod_lines, c_lines, "{text}");
    assert!(text.contains(&format!(
        "# TYPE redirect_build_info gauge\nredirect_build_info{{version=\"{}\"}} 1\n",
        env!("CARGO_PKG_VERSION")
    )));
    assert!(text.contains("# TYPE redirect_map_entries gauge\nredirect_map_entries{map=\"WORKLOADS\"} 1\n"));
    assert!(text.contains("redirect_agent_uptime_seconds 1.500\n"));
    assert!(text.contains("\nredirect_proxy_budget_connections 212\n"));
    assert!(text.contains("\nredirect_proxy_budget_connections_active 3\n"));
    assert!(text.contains("redirect_descriptors_reserved 600\n"));
    // Every sample line belongs to a declared family.
    for l in text.lines().filter(|l| !l.starts_with('#')) {
        let name = l.split(['{', ' ']).next().unwrap();
        assert!(text.contains(&format!("# TYPE {name} ")), "{l}");
    }
}

/// Every query of deploy/grafana/redirect.json names metrics the agent exposes, and groups or
/// selects by labels those metrics carry (`instance` is the scrape's own).
#[test]
fn the_dashboard_asks_for_what_the_agent_exposes() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/grafana/redirect.json");
    let dashboard: serde_json::Value = serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
    let mut queries: Vec<String> = Vec::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().unwrap() {
            queries.push(target["expr"].as_str().unwrap().to_owned());
        }
    }
    for var in dashboard["templating"]["list"].as_array().unwrap() {
        if var["type"] == "query" {
            queries.push(var["query"].as_str().unwrap().to_owned());
        }
    }
    assert!(queries.len() >= 10, "{queries:?}");
    let text = render(&snapshot());
    let words = |s: &str| -> Vec<String> {
        s.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .filter(|w| !w.is_empty())
            .map(str::to_owned)
            .collect()
    };
    for query in &queries {
        let metrics: Vec<String> = words(query)
            .into_iter()
            .filter(|w| w.starts_with("redirect_"))
            .collect();
        assert!(!metrics.is_empty(), "{query}");
        for m in &metrics {
            assert!(
                text.contains(&format!("# TYPE {m} ")),
                "{query}: the agent exposes no {m}"
            );
        }
        // Labels: inside `by (…)`, before `=`/`=~` in selectors, and label_values' second part.
        let mut labels: Vec<String> = Vec::new();
        for part in query.split("by (").skip(1) {
            labels.extend(words(part.split(')').next().unwrap()));
        }
        for part in query.split('{').skip(1) {
            let inner = part.split('}').next().unwrap();
            labels.extend(
                inner
                    .split(',')
                    .filter_map(|m| Some(m.split('=').next()?.trim().to_owned())),
            );
        }
        if let Some(rest) = query.strip_prefix("label_values(") {
            labels.extend(
                rest.rsplit(',')
                    .next()
                    .map(|l| l.trim().trim_end_matches(')').to_owned()),
            );
        }
        for label in labels.iter().filter(|l| !l.is_empty() && *l != "instance") {
            let carried = metrics.iter().any(|m| {
                text.lines()
                    .any(|l| l.starts_with(&format!("{m}{{")) && l.contains(&format!("{label}=")))
            });
            assert!(carried, "{query}: no sample of {metrics:?} has a label {label}");
        }
    }
}
