//! uThread network I/O on loopback, on the real kernel (io_uring sockets, userfaultfd
//! regions, an O_DIRECT swap file on ext4): many connections on two workers, a slow client,
//! a vanishing client, timeouts, region buffers under memory pressure, shutdown.
//!
//! Clients are plain OS threads using `std::net` with read timeouts, so a broken server
//! fails a test instead of hanging it. Every test is bounded in connections and time.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream as StdStream};
use std::time::{Duration, Instant};
use usm_sync::Arc;
use usm_sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};

use usm_runtime::embedded::{NetError, Runtime, TcpListener, TcpStream};

const CLIENT_TIMEOUT: Duration = Duration::from_secs(30);

fn runtime(workers: usize) -> Runtime {
    Runtime::builder().workers(workers).build().unwrap()
}

fn client(addr: SocketAddr) -> StdStream {
    let s = StdStream::connect(addr).unwrap();
    s.set_read_timeout(Some(CLIENT_TIMEOUT)).unwrap();
    s.set_write_timeout(Some(CLIENT_TIMEOUT)).unwrap();
    s.set_nodelay(true).unwrap();
    s
}

/// Deterministic bytes for (stream, offset).
fn pattern(seed: u64, off: usize) -> u8 {
    let x = (seed ^ (off as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15))
        .wrapping_mul(0xff51_afd7_ed55_8ccd);
    (x >> 56) as u8
}

/// Echoes length-prefixed messages (u32 LE length, then bytes) until EOF.
fn echo_framed(mut conn: TcpStream) -> Result<u64, NetError> {
    let mut served = 0;
    let mut buf = vec![0u8; 64 << 10];
    loop {
        let mut len = [0u8; 4];
        match conn.read_exact(&mut len) {
            Ok(()) => {}
            Err(NetError::Closed { .. }) => return Ok(served),
            Err(e) => return Err(e),
        }
        let len = u32::from_le_bytes(len) as usize;
        conn.read_exact(&mut buf[..len])?;
        conn.write_all(&(len as u32).to_le_bytes())?;
        conn.write_all(&buf[..len])?;
        served += 1;
    }
}

/// Accepts forever, one uThread per connection, alternating workers; counts per worker.
fn serve(
    rt: &Runtime,
    listener: TcpListener,
    per_worker: Arc<Vec<AtomicU64>>,
    errors: Arc<AtomicU64>,
) {
    let handle = rt.handle().unwrap();
    rt.spawn(move || {
        let mut next = 0usize;
        while let Ok(conn) = listener.accept() {
            let (per_worker, errors) = (per_worker.clone(), errors.clone());
            let w = next % per_worker.len();
            next += 1;
            let _ = handle.spawn_on(w, move || {
                if let Some(i) = usm_localmanager::worker_index() {
                    per_worker[i].fetch_add(1, Ordering::Relaxed);
                }
                if echo_framed(conn).is_err() {
                    errors.fetch_add(1, Ordering::Relaxed);
                }
            });
        }
    })
    .unwrap();
}

fn round_trip(s: &mut StdStream, seed: u64, len: usize) {
    let msg: Vec<u8> = (0..len).map(|i| pattern(seed, i)).collect();
    s.write_all(&(len as u32).to_le_bytes()).unwrap();
    s.write_all(&msg).unwrap();
    let mut l = [0u8; 4];
    s.read_exact(&mut l).unwrap();
    assert_eq!(u32::from_le_bytes(l) as usize, len);
    let mut back = vec![0u8; len];
    s.read_exact(&mut back).unwrap();
    assert!(back == msg, "echo of {len} bytes (seed {seed}) differs");
}

#[test]
fn many_concurrent_connections_are_served_by_two_workers() {
    let rt = runtime(2);
    let listener = rt.net().bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let per_worker = Arc::new(vec![AtomicU64::new(0), AtomicU64::new(0)]);
    let errors = Arc::new(AtomicU64::new(0));
    serve(&rt, listener, per_worker.clone(), errors.clone());
    let clients = 64;
    let trips = 50;
    let threads: Vec<_> = (0..clients)
        .map(|c| {
            std::thread::spawn(move || {
                let mut s = client(addr);
                for t in 0..trips {
                    let len = 1 + (pattern(c, t) as usize * 61) % 9000;
                    round_trip(&mut s, c * 1000 + t as u64, len);
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    // Connections close; their uThreads end with Ok.
    let deadline = Instant::now() + Duration::from_secs(10);
    while per_worker
        .iter()
        .map(|c| c.load(Ordering::Relaxed))
        .sum::<u64>()
        < clients
        && Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(5));
    }
    let counts: Vec<u64> = per_worker
        .iter()
        .map(|c| c.load(Ordering::Relaxed))
        .collect();
    assert_eq!(
        counts.iter().sum::<u64>(),
        clients,
        "connections served per worker: {counts:?}"
    );
    assert!(
        counts.iter().all(|&c| c > 0),
        "both workers served connections: {counts:?}"
    );
    assert_eq!(errors.load(Ordering::Relaxed), 0);
    let report = rt.shutdown(Duration::from_secs(2));
    assert!(report.stuck_in_handler.is_empty());
}

#[test]
fn a_slow_client_does_not_block_others_on_one_worker() {
    // One worker: if a read blocked the worker, nobody else could be served.
    let rt = runtime(1);
    let listener = rt.net().bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let errors = Arc::new(AtomicU64::new(0));
    serve(
        &rt,
        listener,
        Arc::new(vec![AtomicU64::new(0)]),
        errors.clone(),
    );
    // The slow client sends half a message and stalls until the others are done.
    let others_done = Arc::new(AtomicBool::new(false));
    let slow_resumed_early = Arc::new(AtomicBool::new(false));
    let slow = {
        let (others_done, early) = (others_done.clone(), slow_resumed_early.clone());
        std::thread::spawn(move || {
            let mut s = client(addr);
            let msg: Vec<u8> = (0..1000).map(|i| pattern(7, i)).collect();
            s.write_all(&1000u32.to_le_bytes()).unwrap();
            s.write_all(&msg[..500]).unwrap();
            let deadline = Instant::now() + Duration::from_secs(20);
            while !others_done.load(Ordering::Acquire) {
                if Instant::now() > deadline {
                    early.store(true, Ordering::Release);
                    break;
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            s.write_all(&msg[500..]).unwrap();
            let mut back = vec![0u8; 1004];
            s.read_exact(&mut back).unwrap();
            assert_eq!(&back[4..], &msg[..]);
        })
    };
    std::thread::sleep(Duration::from_millis(50));
    let fast: Vec<_> = (0..8u64)
        .map(|c| {
            std::thread::spawn(move || {
                let mut s = client(addr);
                for t in 0..100 {
                    round_trip(&mut s, 100 + c * 1000 + t, 200);
                }
            })
        })
        .collect();
    for t in fast {
        t.join().unwrap();
    }
    others_done.store(true, Ordering::Release);
    slow.join().unwrap();
    assert!(
        !slow_resumed_early.load(Ordering::Acquire),
        "the fast clients were not served while the slow one stalled"
    );
    assert_eq!(errors.load(Ordering::Relaxed), 0);
}

#[test]
fn a_client_vanishing_mid_request_is_an_error_value_and_the_server_keeps_serving() {
    let rt = runtime(2);
    let listener = rt.net().bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let outcomes = Arc::new(usm_sync::Mutex::new(Vec::<String>::new()));
    let served = Arc::new(AtomicUsize::new(0));
    {
        let (outcomes, served) = (outcomes.clone(), served.clone());
        let handle = rt.handle().unwrap();
        rt.spawn(move || {
            while let Ok(mut conn) = listener.accept() {
                let (outcomes, served) = (outcomes.clone(), served.clone());
                let _ = handle.spawn(move || {
                    // A request is 64 KiB; the reply is 8 MiB (larger than socket buffers).
                    let mut req = vec![0u8; 64 << 10];
                    let r = conn
                        .read_exact(&mut req)
                        .and_then(|()| conn.write_all(&vec![0xA5; 8 << 20]));
                    let text = match r {
                        Ok(()) => "ok".to_string(),
                        Err(e) if e.is_disconnect() => "disconnect".to_string(),
                        Err(e) => format!("other: {e}"),
                    };
                    outcomes.lock().unwrap().push(text);
                    served.fetch_add(1, Ordering::Release);
                });
            }
        })
        .unwrap();
    }
    // 1: sends 10 KiB of a 64 KiB request and goes away.
    {
        let mut s = client(addr);
        s.write_all(&[1u8; 10 << 10]).unwrap();
    }
    // 2: sends a full request, reads 4 KiB of the reply and resets the connection.
    {
        let mut s = client(addr);
        s.write_all(&[2u8; 64 << 10]).unwrap();
        let mut part = [0u8; 4096];
        s.read_exact(&mut part).unwrap();
        assert!(part.iter().all(|&b| b == 0xA5));
        drop(s);
    }
    // 3: a well-behaved client is still served completely.
    {
        let mut s = client(addr);
        s.write_all(&[3u8; 64 << 10]).unwrap();
        let mut reply = vec![0u8; 8 << 20];
        s.read_exact(&mut reply).unwrap();
        assert!(reply.iter().all(|&b| b == 0xA5));
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    while served.load(Ordering::Acquire) < 3 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    let mut got = outcomes.lock().unwrap().clone();
    got.sort();
    assert_eq!(
        got,
        vec!["disconnect", "disconnect", "ok"],
        "per-connection outcomes"
    );
}

#[test]
fn timeouts_fire_as_values_and_leave_the_connection_usable() {
    let rt = runtime(2);
    let mut listener = rt.net().bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    let client_go = Arc::new(AtomicBool::new(false));
    let go = client_go.clone();
    rt.spawn(move || {
        let report = |s: String| tx.send(s).unwrap();
        listener.set_accept_timeout(Some(Duration::from_millis(50)));
        let t0 = Instant::now();
        match listener.accept() {
            Err(e) if e.is_timeout() => report(format!(
                "accept timeout {}",
                t0.elapsed() >= Duration::from_millis(50)
            )),
            other => report(format!("accept: {:?}", other.map(|_| ()))),
        }
        go.store(true, Ordering::Release);
        listener.set_accept_timeout(Some(Duration::from_secs(20)));
        let mut conn = listener.accept().unwrap();
        conn.set_read_timeout(Some(Duration::from_millis(100)));
        let mut buf = [0u8; 16];
        match conn.read(&mut buf) {
            Err(e) if e.is_timeout() => report("read timeout".into()),
            other => report(format!("read: {other:?}")),
        }
        conn.set_read_timeout(Some(Duration::from_secs(20)));
        let n = conn.read(&mut buf).unwrap();
        report(format!("read {:?}", &buf[..n]));
        conn.set_write_timeout(Some(Duration::from_secs(5)));
        conn.write_all(b"pong").unwrap();
    })
    .unwrap();
    let recv = || rx.recv_timeout(CLIENT_TIMEOUT).unwrap();
    assert_eq!(recv(), "accept timeout true");
    while !client_go.load(Ordering::Acquire) {
        std::thread::sleep(Duration::from_millis(1));
    }
    let mut s = client(addr);
    assert_eq!(recv(), "read timeout");
    s.write_all(b"ping").unwrap();
    assert_eq!(recv(), "read [112, 105, 110, 103]");
    let mut back = [0u8; 4];
    s.read_exact(&mut back).unwrap();
    assert_eq!(&back, b"pong");
}

#[test]
fn a_full_peer_makes_a_write_time_out() {
    let rt = runtime(1);
    let listener = rt.net().bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    rt.spawn(move || {
        let mut conn = listener.accept().unwrap();
        conn.set_write_timeout(Some(Duration::from_millis(200)));
        let chunk = vec![0u8; 1 << 20];
        let mut sent = 0usize;
        let r = loop {
            match conn.write(&chunk) {
                Ok(n) => sent += n,
                Err(e) => break e,
            }
            if sent > 1 << 30 {
                break NetError::Closed { op: "never filled" };
            }
        };
        tx.send(format!("{} {}", r.is_timeout(), sent > 0)).unwrap();
    })
    .unwrap();
    let s = client(addr); // never reads
    assert_eq!(rx.recv_timeout(CLIENT_TIMEOUT).unwrap(), "true true");
    drop(s);
}

#[test]
fn region_buffers_under_memory_pressure_keep_every_byte() {
    let dir = tempfile::Builder::new()
        .prefix("usm-net-")
        .tempdir_in("/var/tmp")
        .unwrap();
    let frames = 256; // 1 MiB pool
    let rt = Runtime::builder()
        .workers(2)
        .pool_frames(frames)
        .create_swap_file(dir.path().join("swap0"), 64 << 20)
        .build()
        .unwrap();
    let per_conn = 1 << 20; // 1 MiB per connection, 6 connections: 6x the pool
    let conns = 6u64;
    let listener = rt.net().bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let errors = Arc::new(usm_sync::Mutex::new(Vec::<String>::new()));
    let net_rt = Arc::new(rt);
    {
        let errors = errors.clone();
        let rt2 = net_rt.clone();
        net_rt
            .spawn(move || {
                for c in 0..conns {
                    let mut conn = listener.accept().unwrap();
                    let mut region = rt2.region(per_conn).unwrap();
                    let errors = errors.clone();
                    rt2.spawn(move || {
                        let r = (|| -> Result<(), NetError> {
                            // Receive straight into the region, in 64 KiB pieces: half
                            // through read_exact_region, half through a plain slice of it.
                            let half = per_conn / 2;
                            for off in (0..half).step_by(64 << 10) {
                                conn.read_exact_region(&mut region, off..off + (64 << 10))?;
                            }
                            for off in (half..per_conn).step_by(64 << 10) {
                                conn.read_exact(region.bytes_mut(off..off + (64 << 10)))?;
                            }
                            // Hand the turn back: the client sends one byte when every
                            // connection's data is in (so most pages were evicted meanwhile).
                            let mut go = [0u8; 1];
                            conn.read_exact(&mut go)?;
                            for off in (0..per_conn).step_by(128 << 10) {
                                conn.write_all_region(&region, off..off + (128 << 10))?;
                            }
                            Ok(())
                        })();
                        if let Err(e) = r {
                            errors.lock().unwrap().push(format!("conn {c}: {e}"));
                        }
                    })
                    .unwrap();
                }
            })
            .unwrap();
    }
    let received = Arc::new(AtomicUsize::new(0));
    let threads: Vec<_> = (0..conns)
        .map(|c| {
            let received = received.clone();
            std::thread::spawn(move || {
                let mut s = client(addr);
                let data: Vec<u8> = (0..per_conn).map(|i| pattern(c + 77, i)).collect();
                s.write_all(&data).unwrap();
                received.fetch_add(1, Ordering::AcqRel);
                let deadline = Instant::now() + CLIENT_TIMEOUT;
                while received.load(Ordering::Acquire) < conns as usize && Instant::now() < deadline
                {
                    std::thread::sleep(Duration::from_millis(2));
                }
                s.write_all(&[1]).unwrap();
                let mut back = vec![0u8; per_conn];
                s.read_exact(&mut back).unwrap();
                let bad = back.iter().zip(&data).filter(|(a, b)| a != b).count();
                assert_eq!(
                    bad, 0,
                    "connection {c}: {bad} bytes differ after the round trip"
                );
                s.shutdown(Shutdown::Both).unwrap();
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    assert!(
        errors.lock().unwrap().is_empty(),
        "server errors: {:?}",
        errors.lock().unwrap()
    );
    let stats = net_rt.stats();
    assert!(
        stats.mm.evicted > 0,
        "no eviction: the test did not exert pressure"
    );
    assert!(
        stats.mm.swap_ins > 0,
        "no swap-in: the sends did not fault pages back"
    );
}

/// A reader and a writer uThread on two handles of one connection (`try_clone`): the
/// writer sends while the reader is parked in a read, and both see every byte.
#[test]
fn a_cloned_stream_reads_and_writes_from_two_uthreads() {
    let rt = runtime(2);
    let listener = rt.net().bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let handle = rt.handle().unwrap();
    let server = rt
        .spawn(move || -> Result<u64, NetError> {
            let mut reader = listener.accept()?;
            let mut writer = reader.try_clone()?;
            // The writer goes first and on its own uThread: 256 KiB while nobody reads
            // here, so it parks in send until the client drains.
            let w = handle
                .spawn(move || -> Result<(), NetError> {
                    let out: Vec<u8> = (0..256 << 10).map(|i| pattern(7, i)).collect();
                    writer.write_all(&out)
                })
                .unwrap();
            let mut got = 0u64;
            let mut buf = vec![0u8; 16 << 10];
            loop {
                match reader.read(&mut buf)? {
                    0 => break,
                    n => {
                        for (i, b) in buf[..n].iter().enumerate() {
                            assert_eq!(*b, pattern(9, got as usize + i));
                        }
                        got += n as u64;
                    }
                }
            }
            w.join().unwrap()?;
            Ok(got)
        })
        .unwrap();
    let mut c = client(addr);
    let mut c2 = c.try_clone().unwrap();
    let sender = std::thread::spawn(move || {
        let out: Vec<u8> = (0..128 << 10).map(|i| pattern(9, i)).collect();
        c2.write_all(&out).unwrap();
        c2.shutdown(Shutdown::Write).unwrap();
    });
    let mut back = Vec::new();
    c.read_to_end(&mut back).unwrap();
    sender.join().unwrap();
    assert_eq!(back.len(), 256 << 10);
    assert!(back.iter().enumerate().all(|(i, b)| *b == pattern(7, i)));
    assert_eq!(server.join().unwrap().unwrap(), 128 << 10);
    rt.shutdown(Duration::from_secs(1));
}

#[test]
fn connect_from_a_uthread() {
    let rt = runtime(2);
    let server = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = server.local_addr().unwrap();
    let echo = std::thread::spawn(move || {
        let (mut s, _) = server.accept().unwrap();
        let mut buf = [0u8; 5];
        s.read_exact(&mut buf).unwrap();
        s.write_all(&buf).unwrap();
    });
    let net = rt.net();
    let got = rt
        .block_on(move || {
            let mut c = net.connect(addr).unwrap();
            c.write_all(b"hello").unwrap();
            let mut buf = [0u8; 5];
            c.read_exact(&mut buf).unwrap();
            buf
        })
        .unwrap();
    assert_eq!(&got, b"hello");
    echo.join().unwrap();
    // Nothing listens on a fresh port: ECONNREFUSED as a value.
    let free = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let net = rt.net();
    let err = rt
        .block_on(move || net.connect(free).map(|_| ()))
        .unwrap()
        .unwrap_err();
    assert!(
        matches!(&err, NetError::Io { source, .. } if source.raw_os_error() == Some(libc::ECONNREFUSED)),
        "{err}"
    );
}

#[test]
fn operations_off_a_uthread_are_refused() {
    let rt = runtime(1);
    let listener = rt.net().bind("127.0.0.1:0").unwrap();
    let err = listener.accept().unwrap_err();
    assert!(
        matches!(err, NetError::NotInUThread { op: "accept" }),
        "{err}"
    );
}

#[test]
fn shutdown_closes_every_connection_and_the_listener() {
    let rt = runtime(2);
    let listener = rt.net().bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let parked = Arc::new(AtomicUsize::new(0));
    {
        let parked = parked.clone();
        let handle = rt.handle().unwrap();
        rt.spawn(move || {
            while let Ok(mut conn) = listener.accept() {
                let parked = parked.clone();
                let _ = handle.spawn(move || {
                    parked.fetch_add(1, Ordering::AcqRel);
                    let mut buf = [0u8; 8];
                    let _ = conn.read(&mut buf); // parks until shutdown
                });
            }
        })
        .unwrap();
    }
    let mut clients: Vec<StdStream> = (0..4).map(|_| client(addr)).collect();
    let deadline = Instant::now() + Duration::from_secs(10);
    while parked.load(Ordering::Acquire) < 4 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(2));
    }
    assert_eq!(parked.load(Ordering::Acquire), 4);
    let report = rt.shutdown(Duration::from_millis(500));
    assert!(
        report.cancelled >= 5,
        "accept + 4 reads cancelled: {}",
        report.cancelled
    );
    for c in clients.iter_mut() {
        let mut buf = [0u8; 1];
        match c.read(&mut buf) {
            Ok(0) => {}
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
            other => panic!("connection still open after shutdown: {other:?}"),
        }
    }
    assert!(
        StdStream::connect(addr).is_err(),
        "the listener is still open"
    );
}

/// Multishot accept (opt-in): connections arriving one after another are all
/// accepted by one armed request; dropping the listener closes the connections it had
/// already accepted into its queue but nobody took (the client sees the close).
#[test]
fn multishot_accept_serves_every_connection_and_a_dropped_listener_closes_its_queue() {
    let rt = runtime(2);
    let mut listener = rt.net().bind("127.0.0.1:0").unwrap();
    listener.set_multishot(true);
    let addr = listener.local_addr().unwrap();
    const N: usize = 50;
    let server = rt
        .spawn(move || -> Result<usize, NetError> {
            let mut served = 0;
            for _ in 0..N {
                let mut c = listener.accept()?;
                let mut b = [0u8; 1];
                c.read_exact(&mut b)?;
                c.write_all(&b)?;
                served += 1;
            }
            // The client's late connections arrive meanwhile and wait in the queue.
            usm_runtime::embedded::sleep(Duration::from_millis(300));
            drop(listener);
            Ok(served)
        })
        .unwrap();
    for i in 0..N {
        let mut c = client(addr);
        c.write_all(&[i as u8]).unwrap();
        let mut b = [0u8; 1];
        c.read_exact(&mut b).unwrap();
        assert_eq!(b[0], i as u8);
    }
    let late: Vec<StdStream> = (0..3).map(|_| client(addr)).collect();
    assert_eq!(server.join().unwrap().unwrap(), N);
    for mut c in late {
        let mut b = [0u8; 1];
        match c.read(&mut b) {
            Ok(0) => {}
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
            other => panic!("a queued connection was not closed with its listener: {other:?}"),
        }
    }
    // And nothing listens any more.
    assert!(StdStream::connect(addr).is_err());
    rt.shutdown(Duration::from_secs(1));
}

/// One connection, strictly one request in flight (so nothing else ever wakes the worker):
/// every completion must wake its uThread by itself. Before the network ring's eventfd was
/// read only right before the worker blocks, a completion posted between the driver's
/// "any CQE?" check and its eventfd read lost its wake-up, and the connection hung forever
/// (seen as a usm-kv GET without a reply in CI; the code before the fix hung here after 141
/// round trips, and usm-kv release builds after 40 000 to 310 000 sequential GETs). A lost
/// wake-up fails here by the client's read timeout.
#[test]
fn a_lone_ping_pong_connection_never_loses_a_wake_up() {
    const ROUND_TRIPS: usize = 400_000;
    const STALL: Duration = Duration::from_secs(10);
    let rt = runtime(2);
    let listener = rt.net().bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    rt.spawn(move || {
        let Ok(mut conn) = listener.accept() else {
            return;
        };
        let _ = conn.set_nodelay(true);
        let mut b = [0u8; 1];
        while let Ok(1) = conn.read(&mut b) {
            if conn.write_all(&b).is_err() {
                break;
            }
        }
    })
    .unwrap();
    let mut s = client(addr);
    s.set_read_timeout(Some(STALL)).unwrap();
    let started = Instant::now();
    for i in 0..ROUND_TRIPS {
        let byte = [i as u8];
        s.write_all(&byte).unwrap();
        let mut back = [0u8; 1];
        if let Err(e) = s.read_exact(&mut back) {
            panic!(
                "round trip {i} of {ROUND_TRIPS}: no reply within {STALL:?} ({e}): a lost wake-up"
            );
        }
        assert_eq!(back, byte, "round trip {i}");
    }
    eprintln!(
        "{ROUND_TRIPS} round trips in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    drop(s);
    rt.shutdown(Duration::from_secs(5));
}
