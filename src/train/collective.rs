//! Collectives of data-parallel training: a sum over ranks (all-reduce) and
//! a gather (all-gather), written once over a two-call transport
//! (`Transport::exchange`: send to one rank, receive from another).
//!
//! The sum is a ring all-reduce (a reduce-scatter, then an all-gather, as
//! NCCL and Horovod do): each rank sends and receives 2 (N - 1) / N of the
//! vector, whatever N. Each chunk is summed in one fixed order around the
//! ring and its finished bits are then copied to every rank, so every rank
//! ends with the same bits, and a run repeats itself bit for bit: the ranks'
//! parameters never drift apart (an MPI library's own all-reduce may sum in
//! a different order on different ranks).
//!
//! Transports: MPI (`cli::distributed`, cargo feature `mpi`) and threads in
//! one process (`ThreadTransport`, used by the tests to check a
//! data-parallel step against a one-process step with no MPI installed).

use crate::error::{Error, Result};
use bytemuck::Pod;

/// Point-to-point messages between the ranks of one job.
pub trait Transport {
    /// This process's rank, `0..size`.
    fn rank(&self) -> usize;
    /// Ranks in the job.
    fn size(&self) -> usize;
    /// Send `send` to rank `to` and receive exactly `recv.len()` bytes from
    /// rank `from`, without deadlock when every rank calls it at once.
    fn exchange(&self, send: &[u8], to: usize, recv: &mut [u8], from: usize) -> Result<()>;
}

/// The collectives over a transport.
pub struct Comm {
    transport: Box<dyn Transport>,
    /// Bytes this rank has sent so far (the benchmark's traffic numbers).
    sent: std::cell::Cell<u64>,
    /// Seconds spent in the transport's exchanges so far (waiting for the
    /// other ranks included).
    busy: std::cell::Cell<f64>,
}

impl std::fmt::Debug for Comm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Comm(rank {} of {})", self.rank(), self.size())
    }
}

/// Where chunk `c` of `n` elements split over `parts` begins and ends.
fn chunk(n: usize, parts: usize, c: usize) -> std::ops::Range<usize> {
    (c * n / parts)..((c + 1) * n / parts)
}

impl Comm {
    pub fn new(transport: Box<dyn Transport>) -> Comm {
        Comm {
            transport,
            sent: std::cell::Cell::new(0),
            busy: std::cell::Cell::new(0.0),
        }
    }

    pub fn rank(&self) -> usize {
        self.transport.rank()
    }

    pub fn size(&self) -> usize {
        self.transport.size()
    }

    /// Bytes this rank has sent so far.
    pub fn bytes_sent(&self) -> u64 {
        self.sent.get()
    }

    /// Seconds this rank has spent exchanging so far.
    pub fn exchange_s(&self) -> f64 {
        self.busy.get()
    }

    fn exchange<T: Pod>(&self, send: &[T], to: usize, recv: &mut [T], from: usize) -> Result<()> {
        self.sent
            .set(self.sent.get() + std::mem::size_of_val(send) as u64);
        let clock = web_time::Instant::now();
        let r = self.transport.exchange(
            bytemuck::cast_slice(send),
            to,
            bytemuck::cast_slice_mut(recv),
            from,
        );
        self.busy
            .set(self.busy.get() + clock.elapsed().as_secs_f64());
        r
    }

    /// Element-wise sum over the ranks, in place: every rank ends with the
    /// same bits (a ring all-reduce).
    pub fn sum<T: Pod + std::ops::AddAssign>(&self, v: &mut [T]) -> Result<()> {
        let (r, n) = (self.rank(), self.size());
        if n == 1 {
            return Ok(());
        }
        let (next, prev) = ((r + 1) % n, (r + n - 1) % n);
        let len = v.len();
        let mut buf: Vec<T> = vec![T::zeroed(); len / n + 1];
        // Reduce-scatter: after n - 1 steps rank r holds the whole sum of
        // chunk (r + 1) mod n, summed in ring order from rank r + 2.
        for s in 0..n - 1 {
            let send = chunk(len, n, (r + n - s) % n);
            let recv = chunk(len, n, (r + 2 * n - s - 1) % n);
            let got = &mut buf[..recv.len()];
            let out: Vec<T> = v[send].to_vec();
            self.exchange(&out, next, got, prev)?;
            for (x, &y) in v[recv].iter_mut().zip(got.iter()) {
                *x += y;
            }
        }
        // All-gather of the finished chunks.
        for s in 0..n - 1 {
            let send = chunk(len, n, (r + 1 + n - s) % n);
            let recv = chunk(len, n, (r + n - s) % n);
            let out: Vec<T> = v[send].to_vec();
            let got = &mut buf[..recv.len()];
            self.exchange(&out, next, got, prev)?;
            v[recv].copy_from_slice(got);
        }
        Ok(())
    }

    /// Every rank's `v` (all of one length), in rank order.
    pub fn gather<T: Pod>(&self, v: &[T]) -> Result<Vec<T>> {
        let (r, n) = (self.rank(), self.size());
        let len = v.len();
        let mut all = vec![T::zeroed(); len * n];
        all[r * len..(r + 1) * len].copy_from_slice(v);
        let (next, prev) = ((r + 1) % n, (r + n - 1) % n);
        let mut got = vec![T::zeroed(); len];
        for s in 0..n.saturating_sub(1) {
            let send = (r + n - s) % n;
            let recv = (r + 2 * n - s - 1) % n;
            let out = all[send * len..(send + 1) * len].to_vec();
            self.exchange(&out, next, &mut got, prev)?;
            all[recv * len..(recv + 1) * len].copy_from_slice(&got);
        }
        Ok(all)
    }

    /// Personalized all-to-all of variable sizes: `send[j]` goes to rank j
    /// (`send[rank]` stays); returns what each rank sent to this one, in
    /// rank order. Pairwise in a fixed order (step s: to rank + s, from
    /// rank - s), the sizes first, then the payloads: what expert
    /// parallelism's token rows take.
    pub fn all_to_all_v<T: Pod>(&self, send: &[Vec<T>]) -> Result<Vec<Vec<T>>> {
        let (r, n) = (self.rank(), self.size());
        if send.len() != n {
            return Err(Error::invalid(
                "distributed",
                format!("an all-to-all over {n} ranks given {} parts", send.len()),
            ));
        }
        let mut got: Vec<Vec<T>> = (0..n).map(|_| Vec::new()).collect();
        got[r] = send[r].clone();
        for s in 1..n {
            let (to, from) = ((r + s) % n, (r + n - s) % n);
            let mut len = [0u64];
            self.exchange(&[send[to].len() as u64], to, &mut len, from)?;
            let mut buf = vec![T::zeroed(); len[0] as usize];
            self.exchange(&send[to], to, &mut buf, from)?;
            got[from] = buf;
        }
        Ok(got)
    }

    /// Check that every rank holds the same `value` (a hash of its
    /// configuration and data): a clear error naming the ranks that differ.
    pub fn check_same(&self, what: &str, value: u64) -> Result<()> {
        let all = self.gather(&[value])?;
        let differ: Vec<String> = all
            .iter()
            .enumerate()
            .filter(|(_, &v)| v != all[0])
            .map(|(i, _)| i.to_string())
            .collect();
        if differ.is_empty() {
            return Ok(());
        }
        Err(Error::invalid(
            "distributed",
            format!(
                "rank(s) {} disagree with rank 0 on {what}: every rank must be started with the same flags and data",
                differ.join(", ")
            ),
        ))
    }

    /// Whether any rank says yes (a stop asked for on one rank stops all of
    /// them at the same step).
    pub fn any(&self, yes: bool) -> Result<bool> {
        let mut v = [u32::from(yes)];
        self.sum(&mut v)?;
        Ok(v[0] > 0)
    }
}

/// FNV-1a over bytes: the agreement check's hash (stable across builds and
/// platforms, unlike `std`'s hasher).
pub fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= b as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// Ranks as threads of one process, over channels: `ThreadTransport::group(n)`
/// gives one transport per rank, to move into its thread.
#[cfg(not(target_arch = "wasm32"))]
pub struct ThreadTransport {
    rank: usize,
    /// `to[j]`: messages from this rank to rank j.
    to: Vec<std::sync::mpsc::Sender<Vec<u8>>>,
    /// `from[j]`: messages from rank j to this rank.
    from: Vec<std::sync::mpsc::Receiver<Vec<u8>>>,
}

#[cfg(not(target_arch = "wasm32"))]
impl ThreadTransport {
    pub fn group(n: usize) -> Vec<ThreadTransport> {
        // channel (i -> j) for every pair.
        let mut senders: Vec<Vec<Option<std::sync::mpsc::Sender<Vec<u8>>>>> =
            (0..n).map(|_| (0..n).map(|_| None).collect()).collect();
        let mut receivers: Vec<Vec<Option<std::sync::mpsc::Receiver<Vec<u8>>>>> =
            (0..n).map(|_| (0..n).map(|_| None).collect()).collect();
        for i in 0..n {
            for j in 0..n {
                let (tx, rx) = std::sync::mpsc::channel();
                senders[i][j] = Some(tx);
                receivers[j][i] = Some(rx);
            }
        }
        senders
            .into_iter()
            .zip(receivers)
            .enumerate()
            .map(|(rank, (to, from))| ThreadTransport {
                rank,
                to: to.into_iter().flatten().collect(),
                from: from.into_iter().flatten().collect(),
            })
            .collect()
    }
}

#[cfg(not(target_arch = "wasm32"))]
impl Transport for ThreadTransport {
    fn rank(&self) -> usize {
        self.rank
    }

    fn size(&self) -> usize {
        self.to.len()
    }

    fn exchange(&self, send: &[u8], to: usize, recv: &mut [u8], from: usize) -> Result<()> {
        let gone = |what: &str| {
            Error::invalid(
                "distributed",
                format!("rank {}: {what} (another rank has ended)", self.rank),
            )
        };
        self.to[to]
            .send(send.to_vec())
            .map_err(|_| gone("cannot send"))?;
        let got = self.from[from]
            .recv_timeout(std::time::Duration::from_secs(600))
            .map_err(|_| gone("nothing received"))?;
        if got.len() != recv.len() {
            return Err(Error::invalid(
                "distributed",
                format!(
                    "rank {}: received {} bytes from rank {from}, expected {}",
                    self.rank,
                    got.len(),
                    recv.len()
                ),
            ));
        }
        recv.copy_from_slice(&got);
        Ok(())
    }
}

#[cfg(all(test, not(target_arch = "wasm32")))]
mod tests {
    use super::*;

    fn run<R: Send + 'static>(n: usize, f: impl Fn(Comm) -> R + Send + Sync + 'static) -> Vec<R> {
        let f = std::sync::Arc::new(f);
        let handles: Vec<_> = ThreadTransport::group(n)
            .into_iter()
            .map(|t| {
                let f = f.clone();
                std::thread::spawn(move || f(Comm::new(Box::new(t))))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    }

    #[test]
    fn ring_sum_gives_every_rank_the_same_bits_for_any_size() {
        for n in 1..=5 {
            for len in [0usize, 1, 3, 7, 64, 1001] {
                let out = run(n, move |c| {
                    let r = c.rank();
                    let mut v: Vec<f32> = (0..len)
                        .map(|i| ((i * 7 + r * 13) % 11) as f32 * 0.1 + 1e-7 * r as f32)
                        .collect();
                    c.sum(&mut v).unwrap();
                    v
                });
                for (i, x) in out[0].iter().enumerate() {
                    let want: f32 = (0..n)
                        .map(|r| ((i * 7 + r * 13) % 11) as f32 * 0.1 + 1e-7 * r as f32)
                        .sum();
                    assert!(
                        (x - want).abs() <= 1e-5,
                        "n {n} len {len} [{i}]: {x} vs {want}"
                    );
                }
                for o in &out[1..] {
                    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                    assert_eq!(bits(o), bits(&out[0]), "n {n} len {len}: ranks differ");
                }
            }
        }
    }

    #[test]
    fn all_to_all_v_delivers_every_part_in_rank_order() {
        for n in 1..=4 {
            let out = run(n, move |c| {
                let r = c.rank() as u32;
                // Rank r sends (r + j) % 3 values "r j i" to rank j (some empty).
                let send: Vec<Vec<u32>> = (0..n as u32)
                    .map(|j| (0..(r + j) % 3).map(|i| 100 * r + 10 * j + i).collect())
                    .collect();
                c.all_to_all_v(&send).unwrap()
            });
            for (j, got) in out.iter().enumerate() {
                for (r, part) in got.iter().enumerate() {
                    let want: Vec<u32> = (0..(r + j) as u32 % 3)
                        .map(|i| 100 * r as u32 + 10 * j as u32 + i)
                        .collect();
                    assert_eq!(part, &want, "n {n}: rank {j} from {r}");
                }
            }
        }
        let out = run(2, |c| c.all_to_all_v(&[vec![1u32]]).is_err());
        assert_eq!(out, vec![true, true]);
    }

    #[test]
    fn gather_and_agreement() {
        let out = run(3, |c| {
            c.gather(&[c.rank() as u32, 10 + c.rank() as u32]).unwrap()
        });
        for o in out {
            assert_eq!(o, vec![0, 10, 1, 11, 2, 12]);
        }
        let out = run(3, |c| c.check_same("the config", 42).is_ok());
        assert!(out.iter().all(|&ok| ok));
        let out = run(3, |c| {
            let v = if c.rank() == 2 { 7 } else { 42 };
            c.check_same("the config", v).map_err(|e| e.to_string())
        });
        for o in out {
            let e = o.unwrap_err();
            assert!(e.contains("rank(s) 2 disagree"), "{e}");
        }
        let out = run(2, |c| c.any(c.rank() == 1).unwrap());
        assert_eq!(out, vec![true, true]);
        let out = run(4, |c| {
            let mut v = vec![c.rank() as u32; 9];
            c.sum(&mut v).unwrap();
            (v, c.bytes_sent())
        });
        for (v, sent) in out {
            assert_eq!(v, vec![6; 9]);
            // 2 (N - 1) chunks of about len / N elements.
            assert!(sent <= 2 * 3 * 3 * 4, "{sent}");
        }
    }
}
