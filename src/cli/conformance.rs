//! `amoe conformance`: every kernel against its CPU twin, a table per adapter, optional JSON.

use super::args::AdapterArgs;
use super::{contexts, write_json};
use amoe::conformance::{self, AdapterReport};
use amoe::{Error, Result};
use std::process::ExitCode;

#[derive(clap::Args, Clone, Debug)]
pub struct ConformanceArgs {
    /// Only this kernel family (matmul, gate, route, expert, combine, decode,
    /// embedding, rmsnorm, attention, cross_entropy, adamw, add, moe_backward, kv_cache,
    /// complexity).
    #[arg(long)]
    pub kernel: Option<String>,
    /// Also write the results as JSON to this file ("-" for stdout).
    #[arg(long)]
    pub json: Option<String>,
}

fn fmt_err(x: f64) -> String {
    if x.is_nan() {
        "-".into()
    } else {
        format!("{x:.2e}")
    }
}

pub fn run(adapter: &AdapterArgs, args: &ConformanceArgs) -> Result<ExitCode> {
    let family = args.kernel.as_deref();
    let json = args.json.as_deref();
    if let Some(f) = family {
        if !conformance::FAMILIES.contains(&f) {
            return Err(Error::invalid(
                "conformance",
                format!(
                    "unknown kernel family {f:?}; expected one of {}",
                    conformance::FAMILIES.join(", ")
                ),
            ));
        }
    }
    let cases = conformance::cases(family);
    let ctxs = contexts(adapter)?;
    let mut reports: Vec<AdapterReport> = Vec::new();
    let (kw, cw) = cases
        .iter()
        .map(|c| c.names())
        .fold((6, 4), |(kw, cw), (k, c)| {
            (kw.max(k.len()), cw.max(c.len()))
        });
    for ctx in &ctxs {
        outln!("== {} ({} cases)", ctx.adapter_label(), cases.len())?;
        outln!(
            "{:<kw$} {:<cw$} {:>9} {:>9} {:>8} {:>6}",
            "kernel",
            "case",
            "max_abs",
            "max_rel",
            "GFLOP/s",
            "result"
        )?;
        // The first failed write (a closed pipe, a full disk) stops the
        // printing; the run's error reports it.
        let mut write_err = None;
        let report = pollster::block_on(conformance::run_cases(ctx, &cases, |r| {
            if write_err.is_some() {
                return;
            }
            let line = outln!(
                "{:<kw$} {:<cw$} {:>9} {:>9} {:>8} {:>6}",
                r.kernel,
                r.case,
                fmt_err(r.max_abs_err),
                fmt_err(r.max_rel_err),
                r.gflops.map(|g| format!("{g:.2}")).unwrap_or_default(),
                if r.pass { "pass" } else { "FAIL" }
            )
            .and_then(|()| match r.note.as_ref().filter(|_| !r.pass) {
                Some(n) => outln!("    {n}"),
                None => Ok(()),
            });
            write_err = line.err();
        }));
        if let Some(e) = write_err {
            return Err(e);
        }
        let failed = report.kernels.iter().filter(|k| !k.pass).count();
        // One line per reason, not per case.
        let mut reasons: Vec<(&str, usize)> = Vec::new();
        for why in &report.not_applicable {
            let reason = why.split_once("]: ").map_or(why.as_str(), |(_, r)| r);
            match reasons.iter_mut().find(|(r, _)| *r == reason) {
                Some((_, n)) => *n += 1,
                None => reasons.push((reason, 1)),
            }
        }
        for (reason, n) in reasons {
            outln!("n/a ({n} cases): {reason}")?;
        }
        outln!(
            "-- {}: {} passed, {} failed, {} not applicable on this adapter",
            ctx.adapter_label(),
            report.kernels.len() - failed,
            failed,
            report.not_applicable.len()
        )?;
        reports.push(report);
    }
    let ok = reports.iter().all(|r| r.pass());
    if let Some(path) = json {
        let text = serde_json::to_string_pretty(&serde_json::json!({ "adapters": reports }))?;
        write_json(path, &text)?;
    }
    Ok(if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
