//! Where a capture flag's value comes from when the command line leaves it out: istio-iptables'
//! environment variables, as its flag package reads them; and owner-group names as iptables
//! resolves them.

use redirect_common::config::{self, ConfigError};

/// Where a flag's value came from: the command line, or an environment variable (named in
/// errors instead of the flag).
pub(super) type Env<'a> = &'a dyn Fn(&str) -> Option<String>;

/// No environment: a node enrollment's flags are all there is.
pub fn no_env(_: &str) -> Option<String> {
    None
}

/// The process environment, as istio-iptables reads it.
pub fn process_env(name: &str) -> Option<String> {
    std::env::var(name).ok()
}

/// The value of one flag: the command line's, else the first of `envs` that is set (later
/// ones win, as istio-iptables' additional variables do), else `default`; with the name to
/// put in an error.
pub(super) fn pick(
    cli: &Option<String>,
    flag: &'static str,
    envs: &[&'static str],
    env: Env,
    default: &str,
) -> (String, &'static str) {
    pick_if(cli, flag, envs, env, default, |_| true)
}

/// [`pick`], taking only the variables whose value `usable` accepts: istio-iptables sets a
/// flag from each variable and drops a value the flag refuses (an empty boolean), keeping the
/// one before.
fn pick_if(
    cli: &Option<String>,
    flag: &'static str,
    envs: &[&'static str],
    env: Env,
    default: &str,
    usable: impl Fn(&str) -> bool,
) -> (String, &'static str) {
    if let Some(v) = cli {
        return (v.clone(), flag);
    }
    let mut found = None;
    for &name in envs {
        if let Some(v) = env(name).filter(|v| usable(v)) {
            found = Some((v, name));
        }
    }
    found.unwrap_or_else(|| (default.to_owned(), flag))
}

/// A boolean flag: the command line's, else the last of `envs` that is set and not empty (an
/// empty value is one pflag refuses, keeping the one before), else false.
pub(super) fn boolean(
    cli: &Option<String>,
    flag: &'static str,
    envs: &[&'static str],
    env: Env,
) -> Result<bool, ConfigError> {
    let (v, f) = pick_if(cli, flag, envs, env, "false", |v| !v.trim().is_empty());
    parse_bool(f, &v)
}

/// istio-iptables' booleans (Go's `strconv.ParseBool`).
fn parse_bool(flag: &'static str, s: &str) -> Result<bool, ConfigError> {
    match s.trim() {
        "1" | "t" | "T" | "true" | "TRUE" | "True" => Ok(true),
        "0" | "f" | "F" | "false" | "FALSE" | "False" | "" => Ok(false),
        _ => Err(ConfigError {
            flag,
            value: s.to_owned(),
            expected: "true or false".into(),
        }),
    }
}

/// Owner-group names to gids, as iptables-restore resolves `--gid-owner NAME` where it runs
/// (`getgrnam`): here, from the agent's /etc/group. A name left unresolved is refused by
/// [`check`] for anything that captures; `explain` prints it as given.
pub(super) fn resolve_groups(groups: &mut config::OwnerGroups) {
    let table = std::fs::read_to_string("/etc/group").unwrap_or_default();
    for g in groups.groups_mut() {
        if g.gid.is_none() {
            g.gid = table.lines().find_map(|l| {
                let mut f = l.split(':');
                (f.next() == Some(g.name.as_str()))
                    .then(|| f.nth(1).and_then(|gid| gid.parse().ok()))
                    .flatten()
            });
        }
    }
}

/// A user's uid from /etc/passwd, as istio-iptables' `user.Lookup(ENVOY_USER)`.
pub(super) fn user_uid(name: &str) -> Option<u32> {
    let table = std::fs::read_to_string("/etc/passwd").ok()?;
    table.lines().find_map(|l| {
        let mut f = l.split(':');
        (f.next() == Some(name))
            .then(|| f.nth(1).and_then(|uid| uid.parse().ok()))
            .flatten()
    })
}
