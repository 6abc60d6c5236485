//! `amoe train --distributed`: the ranks of an MPI job (`mpirun -np N`) as
//! the transport of `amoe::train::collective` (cargo feature `mpi`).

use amoe::train::collective::Comm;
use amoe::{Error, Result};

/// Environment variables an MPI launcher sets for its processes (Open MPI,
/// MPICH and Intel MPI through PMI, PMIx, Slurm's srun).
const LAUNCHER_VARS: &[&str] = &[
    "OMPI_COMM_WORLD_SIZE",
    "PMI_SIZE",
    "PMIX_RANK",
    "MPI_LOCALNRANKS",
    "SLURM_NTASKS",
];

/// The words of the error for `--distributed` outside a launcher.
pub const NO_LAUNCHER: &str = "--distributed needs an MPI launcher: start the ranks with `mpirun -np N amoe train --distributed ...` (this process was not started by one)";

/// Whether an MPI launcher started this process.
pub fn under_launcher() -> bool {
    LAUNCHER_VARS.iter().any(|v| std::env::var_os(v).is_some())
}

#[cfg(feature = "mpi")]
mod imp {
    use super::*;
    use amoe::train::collective::Transport;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::sync::Arc;

    /// Milliseconds since the Unix epoch.
    fn now_ms() -> u64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64)
    }

    /// When this rank's exchange in progress began (0: none), when its
    /// last one ended, and the longest time between two ends (a step, a
    /// validation or a save of the slowest rank): the stop watchdog's clock.
    static IN_SINCE_MS: AtomicU64 = AtomicU64::new(0);
    static LAST_DONE_MS: AtomicU64 = AtomicU64::new(0);
    static LONGEST_GAP_MS: AtomicU64 = AtomicU64::new(0);

    /// After a stop (Ctrl-C, SIGTERM: what mpirun sends every rank when
    /// one dies), each rank stops at the next step boundary, which every
    /// rank must reach. A rank left waiting on a dead one would wait
    /// forever: past 10 s plus three times the longest step seen, a rank
    /// still waiting in an exchange exits (status 130). Saves are atomic:
    /// the checkpoint on disk stays whole.
    pub fn stop_watchdog(flag: Arc<AtomicBool>, rank: usize) {
        std::thread::spawn(move || loop {
            std::thread::sleep(std::time::Duration::from_millis(250));
            if !flag.load(Ordering::SeqCst) {
                continue;
            }
            let since = IN_SINCE_MS.load(Ordering::SeqCst);
            let grace = 10_000 + 3 * LONGEST_GAP_MS.load(Ordering::SeqCst);
            if since > 0 && now_ms().saturating_sub(since) > grace {
                eprintln!(
                    "rank {rank}: stopping, but another rank has not answered for {:.0} s (it has ended?): exiting; the last checkpoint on disk is whole",
                    (now_ms() - since) as f64 / 1000.0
                );
                std::process::exit(130);
            }
        });
    }
    use mpi::point_to_point::send_receive_into;
    use mpi::topology::SimpleCommunicator;
    use mpi::traits::*;

    /// MPI_COMM_WORLD. The universe finalizes MPI when dropped, after the
    /// communicator (fields drop in order).
    pub struct MpiTransport {
        world: SimpleCommunicator,
        _universe: mpi::environment::Universe,
    }

    impl Transport for MpiTransport {
        fn rank(&self) -> usize {
            self.world.rank() as usize
        }

        fn size(&self) -> usize {
            self.world.size() as usize
        }

        fn exchange(&self, send: &[u8], to: usize, recv: &mut [u8], from: usize) -> Result<()> {
            IN_SINCE_MS.store(now_ms(), Ordering::SeqCst);
            let status = send_receive_into(
                send,
                &self.world.process_at_rank(to as i32),
                recv,
                &self.world.process_at_rank(from as i32),
            );
            let done = now_ms();
            let last = LAST_DONE_MS.swap(done, Ordering::SeqCst);
            if last > 0 {
                LONGEST_GAP_MS.fetch_max(done - last, Ordering::SeqCst);
            }
            IN_SINCE_MS.store(0, Ordering::SeqCst);
            let got = status.count(u8::equivalent_datatype()) as usize;
            if got != recv.len() {
                return Err(Error::invalid(
                    "distributed",
                    format!(
                        "rank {}: received {got} bytes from rank {from}, expected {}",
                        self.rank(),
                        recv.len()
                    ),
                ));
            }
            Ok(())
        }
    }

    /// Join the MPI job this process was started in.
    pub fn join() -> Result<Comm> {
        if !under_launcher() {
            return Err(Error::invalid("distributed", NO_LAUNCHER));
        }
        let universe = mpi::initialize().ok_or_else(|| {
            Error::invalid("distributed", "MPI was initialized already in this process")
        })?;
        let world = universe.world();
        Ok(Comm::new(Box::new(MpiTransport {
            world,
            _universe: universe,
        })))
    }

    /// End every rank of the job with `code` (after an error on this one:
    /// the others would wait for it forever).
    pub fn abort(code: i32) -> ! {
        SimpleCommunicator::world().abort(code)
    }
}

#[cfg(feature = "mpi")]
pub use imp::{abort, join, stop_watchdog};

/// Without the `mpi` feature: say how to get it.
#[cfg(not(feature = "mpi"))]
pub fn join() -> Result<Comm> {
    if !under_launcher() {
        return Err(Error::invalid("distributed", NO_LAUNCHER));
    }
    Err(Error::invalid(
        "distributed",
        "this amoe was built without MPI: build it with `cargo build --release --features mpi` (an MPI library and libclang must be installed: Debian's libopenmpi-dev and libclang-dev)",
    ))
}

#[cfg(not(feature = "mpi"))]
pub fn abort(code: i32) -> ! {
    std::process::exit(code)
}

#[cfg(not(feature = "mpi"))]
pub fn stop_watchdog(_flag: std::sync::Arc<std::sync::atomic::AtomicBool>, _rank: usize) {}
