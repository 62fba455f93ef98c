//! `medmesh roster ...`: create, edit, endorse and inspect the consortium roster.

use std::path::Path;

use anyhow::{Context, Result};
use medmesh_crypto::{Member, Role, Roster, RosterError, SignedRoster};

use super::parse_public_key;
use crate::cli::{RoleArg, RosterCommand};
use crate::keystore;

/// Runs one roster subcommand.
pub fn run(command: RosterCommand) -> Result<()> {
    match command {
        RosterCommand::Create {
            consortium,
            stewards,
            threshold,
            out,
        } => {
            let stewards = stewards
                .iter()
                .map(|s| parse_public_key(s))
                .collect::<Result<Vec<_>>>()?;
            let roster = Roster::genesis(consortium, stewards, threshold);
            roster.check()?;
            if out.exists() {
                anyhow::bail!(
                    "{} already exists; refusing to overwrite a roster",
                    out.display()
                );
            }
            keystore::save_roster(&out, &SignedRoster::unsigned(roster))?;
            println!(
                "wrote {}: version 1, no members yet, needs {threshold} endorsement(s)",
                out.display()
            );
            Ok(())
        }
        RosterCommand::Add {
            roster,
            member,
            role,
            site,
        } => {
            let public_key = parse_public_key(&member)?;
            let role = match role {
                RoleArg::Node => Role::Node,
                RoleArg::Researcher => Role::Researcher,
            };
            edit(&roster, |r| {
                r.upsert_member(Member {
                    public_key,
                    role,
                    site,
                })
            })
        }
        RosterCommand::Revoke {
            roster,
            member,
            reason,
        } => {
            let key = parse_public_key(&member)?;
            edit(&roster, |r| r.revoke(key, reason))
        }
        RosterCommand::Endorse { roster, key } => {
            let steward = keystore::load_identity(&key)?;
            let mut signed = keystore::load_roster(&roster)?;
            if !signed.roster.stewards.contains(&steward.public_key()) {
                eprintln!(
                    "note: {} is not a steward of this version; its endorsement counts only where \
                     it is a steward of the previous version",
                    steward.public_key()
                );
            }
            signed.endorse(&steward);
            keystore::save_roster(&roster, &signed)?;
            println!(
                "endorsed {} v{} ({} endorsement(s))",
                signed.roster.consortium,
                signed.roster.version,
                signed.endorsements.len()
            );
            Ok(())
        }
        RosterCommand::Show { roster, previous } => show(&roster, previous.as_deref()),
    }
}

/// Applies `change` to the roster file. An endorsed roster is published, so editing it
/// starts the next version; a draft is edited in place.
fn edit(path: &Path, change: impl FnOnce(&mut Roster)) -> Result<()> {
    let mut signed = keystore::load_roster(path)?;
    let published = !signed.endorsements.is_empty();
    let mut roster = signed.roster.clone();
    change(&mut roster);
    roster
        .check()
        .with_context(|| format!("the edit would break {}", path.display()))?;
    if published {
        roster.version += 1;
    }
    signed = SignedRoster::unsigned(roster);
    keystore::save_roster(path, &signed)?;
    println!(
        "{} v{}: {} member(s), {} revoked{}",
        signed.roster.consortium,
        signed.roster.version,
        signed.roster.members.len(),
        signed.roster.revoked.len(),
        if published {
            " (new version: collect endorsements again)"
        } else {
            ""
        }
    );
    Ok(())
}

fn show(path: &Path, previous: Option<&Path>) -> Result<()> {
    let signed = keystore::load_roster(path)?;
    let r = &signed.roster;
    println!(
        "consortium {}  version {}  digest {}",
        r.consortium,
        r.version,
        hex::encode(r.digest())
    );
    println!("stewards (threshold {}):", r.threshold);
    for s in &r.stewards {
        println!("  {s}");
    }
    println!("members:");
    for m in &r.members {
        println!(
            "  {:<10} {:<24} {}  {}",
            m.role.to_string(),
            m.site,
            m.public_key,
            m.public_key.peer_id()
        );
    }
    for rv in &r.revoked {
        println!("  revoked    {}  ({})", rv.public_key, rv.reason);
    }
    let verdict: Result<(), RosterError> = match previous {
        None => signed.clone().into_genesis(None).map(|_| ()),
        Some(prev) => keystore::load_roster(prev)?
            .into_genesis(None)
            .with_context(|| format!("previous roster {} is not trusted", prev.display()))?
            .accept_update(&signed)
            .map(|_| ()),
    };
    match verdict {
        Ok(()) => {
            println!(
                "status: valid{}",
                previous.map_or(String::new(), |p| format!(" successor of {}", p.display()))
            );
            Ok(())
        }
        Err(e) => Err(e).context(format!("{} is not (yet) trusted", path.display())),
    }
}
