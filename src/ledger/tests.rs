use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use chrono::{TimeDelta, Utc};

use super::record::{next_frame, Next, MAX_BODY};
use super::segment::{list_segments, segment_path, CHECKPOINT_FILE, STATE_FILE};
use super::*;

const ALICE: &str = "alice-7f3a9c-unique-principal";
const ALICE_DEVICE: &str = "alice-watch-55aa17-unique-device";

fn share(user: &str, device: &str, recipient: &str, kind: &str, i: u64) -> ShareRecord {
    ShareRecord {
        time: Utc::now(),
        creator: String::new(),
        recipient: recipient.into(),
        user: user.into(),
        device: device.into(),
        kind: kind.into(),
        pii_category: "Health".into(),
        purpose: "fitness-coaching".into(),
        action: if i.is_multiple_of(2) {
            ShareAction::Delivered
        } else {
            ShareAction::Masked {
                fields: vec![MaskedField {
                    field: "location".into(),
                    method: "coarsen".into(),
                }],
            }
        },
        payload_digest: [i as u8; 32],
        qos: 1,
        receipt_id: Some(format!("jti-{i}")),
    }
}

fn cfg(dir: &Path) -> LedgerConfig {
    LedgerConfig {
        dir: dir.to_path_buf(),
        checkpoint_every: 1_000_000,
        ..LedgerConfig::default()
    }
}

/// Segments of 2 KiB, so a few records close one, and a day's retention.
fn small_with_retention(dir: &Path) -> LedgerConfig {
    LedgerConfig {
        segment_bytes: 2048,
        retention: Some(Duration::from_secs(24 * 3600)),
        ..cfg(dir)
    }
}

fn keys() -> Keyring {
    Keyring::generate().expect("generate keyring")
}

/// One durable share record per time given.
async fn write_at(ledger: &Ledger, times: impl IntoIterator<Item = chrono::DateTime<Utc>>) {
    for (i, time) in times.into_iter().enumerate() {
        let mut r = share(ALICE, ALICE_DEVICE, "fitcoach", "heart_rate", i as u64);
        r.time = time;
        ledger.submit(r).expect("submit").await.expect("durable");
    }
}

async fn write_n(ledger: &Ledger, n: u64) -> Vec<u64> {
    let mut ds = Vec::new();
    for i in 0..n {
        let user = if i % 3 == 0 { ALICE } else { "bob" };
        let dev = if i % 3 == 0 {
            ALICE_DEVICE
        } else {
            "bob-phone"
        };
        ds.push(
            ledger
                .submit(share(user, dev, "fitcoach", "heart_rate", i))
                .expect("submit"),
        );
    }
    let mut seqs = Vec::new();
    for d in ds {
        seqs.push(d.await.expect("durable"));
    }
    seqs
}

/// (start, end, seq) of every frame in a segment file.
/// A ledger opened with `config`, `n` records written, and closed.
async fn write_and_close(config: LedgerConfig, k: &Keyring, n: u64) {
    let ledger = Ledger::open(config, k.clone()).expect("open");
    write_n(&ledger, n).await;
    ledger.shutdown().await;
}

fn frames(path: &Path) -> Vec<(usize, usize, u64)> {
    let data = std::fs::read(path).expect("read segment");
    let mut out = Vec::new();
    let mut off = 0;
    while let Next::Frame(f) = next_frame(&data, off) {
        out.push((off, f.end, f.header.seq));
        off = f.end;
    }
    out
}

fn only_segment(dir: &Path) -> PathBuf {
    let segs = list_segments(dir).expect("list");
    assert_eq!(segs.len(), 1, "expected one segment");
    segs[0].1.clone()
}

fn tamper(err: LedgerError) -> (u64, TamperKind) {
    match err {
        LedgerError::Tampered { seq, kind, .. } => (seq, kind),
        other => panic!("expected a tamper report, got {other:?}"),
    }
}

fn all_file_bytes(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    std::fs::read_dir(dir)
        .expect("read dir")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.is_file())
        .map(|p| {
            let b = std::fs::read(&p).expect("read file");
            (p, b)
        })
        .collect()
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

#[tokio::test]
async fn encryption_round_trip() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let k = keys();
    let ledger = Ledger::open(cfg(tmp.path()), k.clone()).expect("open");
    let original = share(ALICE, ALICE_DEVICE, "fitcoach", "heart_rate", 1);
    let seq = ledger
        .submit(original.clone())
        .expect("submit")
        .await
        .expect("durable");
    assert_eq!(seq, 1);
    let got = ledger
        .read_user(ALICE, &ReadFilter::default())
        .expect("read");
    let mut expected = original;
    expected.creator = "consentry".into();
    assert_eq!(got, vec![(1, Entry::Share(expected))]);
    ledger.shutdown().await;

    // The stored frame only opens under the right key.
    let data = std::fs::read(only_segment(tmp.path())).expect("read");
    let Next::Frame(f) = next_frame(&data, 0) else {
        panic!("no frame")
    };
    assert!(f.decrypt(&k).is_ok());
    assert!(matches!(f.decrypt(&keys()), Err(LedgerError::Crypto)));
    let report = verify_dir(tmp.path(), &k).expect("verify");
    assert_eq!((report.records, report.head_seq), (1, 1));
}

/// A delivery logs a borrowed record, its masked fields as the ACT holds
/// them; it reads back as the owned record with the same content.
#[tokio::test]
async fn a_borrowed_record_reads_back_as_the_owned_one() {
    use crate::model::MaskMethod;
    let tmp = tempfile::tempdir().expect("tempdir");
    let ledger = Ledger::open(cfg(tmp.path()), keys()).expect("open");
    let rules: crate::mask::MaskRules = vec![
        ("lat".to_string(), MaskMethod::Generalize { decimals: 2 }),
        ("name".to_string(), MaskMethod::Pseudonymize),
    ]
    .into();
    let time = Utc::now();
    let borrowed = ShareRef {
        time,
        creator: "",
        recipient: "fitcoach",
        user: ALICE,
        device: ALICE_DEVICE,
        kind: "location",
        pii_category: "Behavioral",
        purpose: "coaching",
        masked: Some(&rules),
        payload_digest: [7; 32],
        qos: 0,
        receipt_id: Some("9f0c2a4e-5b7d-4e1f-8a3c-2d6b9e0f1a7c"),
    };
    ledger
        .submit_ref(&borrowed)
        .expect("submit")
        .await
        .expect("durable");
    let plain = ShareRef {
        masked: None,
        receipt_id: None,
        ..borrowed
    };
    ledger
        .submit_ref(&plain)
        .expect("submit")
        .await
        .expect("durable");
    let got = ledger
        .read_user(ALICE, &ReadFilter::default())
        .expect("read");
    let owned = |action, receipt_id: Option<&str>| ShareRecord {
        time,
        creator: "consentry".into(),
        recipient: "fitcoach".into(),
        user: ALICE.into(),
        device: ALICE_DEVICE.into(),
        kind: "location".into(),
        pii_category: "Behavioral".into(),
        purpose: "coaching".into(),
        action,
        payload_digest: [7; 32],
        qos: 0,
        receipt_id: receipt_id.map(String::from),
    };
    let masked = ShareAction::Masked {
        fields: vec![
            MaskedField {
                field: "lat".into(),
                method: "generalize".into(),
            },
            MaskedField {
                field: "name".into(),
                method: "pseudonymize".into(),
            },
        ],
    };
    assert_eq!(
        got,
        vec![
            (1, Entry::Share(owned(masked, borrowed.receipt_id))),
            (2, Entry::Share(owned(ShareAction::Delivered, None))),
        ]
    );
    ledger.shutdown().await;
}

/// Records queue back to back in one buffer. A writer that takes the queue
/// a few at a time (`max_batch`) must cut that buffer between records, and a
/// record refused for its size must leave nothing behind in it.
#[tokio::test]
async fn queued_records_split_into_batches_and_an_oversized_one_leaves_no_trace() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let k = keys();
    let ledger = Ledger::open(
        LedgerConfig {
            max_batch: 3,
            ..cfg(tmp.path())
        },
        k.clone(),
    )
    .expect("open");
    let mut sent = Vec::new();
    let mut durables = Vec::new();
    for i in 0..40u64 {
        let mut r = share(ALICE, ALICE_DEVICE, "fitcoach", "heart_rate", i);
        // Records of different lengths, so a cut in the wrong place shows.
        r.purpose = "p".repeat(i as usize * 7);
        if i == 20 {
            let mut huge = r.clone();
            huge.purpose = "x".repeat(MAX_BODY);
            assert!(matches!(ledger.submit(huge), Err(LedgerError::Config(_))));
        }
        durables.push(ledger.submit(r.clone()).expect("submit"));
        r.creator = "consentry".into();
        sent.push(r);
    }
    for (i, d) in durables.into_iter().enumerate() {
        assert_eq!(d.await.expect("durable"), i as u64 + 1);
    }
    let got: Vec<_> = ledger
        .read_user(ALICE, &ReadFilter::default())
        .expect("read")
        .into_iter()
        .map(|(_, e)| e)
        .collect();
    assert_eq!(got, sent.into_iter().map(Entry::Share).collect::<Vec<_>>());
    ledger.shutdown().await;
    let report = verify_dir(tmp.path(), &k).expect("verify");
    assert_eq!(report.records, 40);
}

/// Records are encrypted, but that a user's data went to a provider at a
/// time is for the ledger's owner only: nothing in it is readable by others.
#[cfg(unix)]
#[tokio::test]
async fn the_ledger_directory_and_its_files_are_owner_only() {
    use std::os::unix::fs::PermissionsExt;
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("ledger");
    let k = keys();
    let ledger = Ledger::open(
        LedgerConfig {
            checkpoint_every: 1,
            ..cfg(&dir)
        },
        k.clone(),
    )
    .expect("open");
    write_n(&ledger, 3).await;
    ledger.shutdown().await;
    let mode = |p: &Path| std::fs::metadata(p).expect("stat").permissions().mode() & 0o777;
    assert_eq!(mode(&dir), 0o700);
    let files: Vec<_> = std::fs::read_dir(&dir)
        .expect("list")
        .map(|e| e.expect("entry").path())
        .collect();
    assert!(
        files.iter().any(|f| f.ends_with(CHECKPOINT_FILE)),
        "{files:?}"
    );
    assert!(files.iter().any(|f| f.ends_with(STATE_FILE)), "{files:?}");
    for f in &files {
        assert_eq!(mode(f), 0o600, "{}", f.display());
    }

    // One an earlier version left readable by others is made owner-only.
    let loosen = |p: &Path, m: u32| {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(m)).expect("chmod")
    };
    loosen(&dir, 0o755);
    for f in &files {
        loosen(f, 0o644);
    }
    let ledger = Ledger::open(cfg(&dir), k).expect("reopen");
    ledger.shutdown().await;
    assert_eq!(mode(&dir), 0o700);
    for f in &files {
        assert_eq!(mode(f), 0o600, "{}", f.display());
    }
}

#[tokio::test]
async fn nonces_unique_across_reopens_crashes_and_lost_state() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let k = keys();
    for cycle in 0..5 {
        write_and_close(cfg(tmp.path()), &k, 40).await;
        match cycle {
            // A crash that tore the tail: the cut record's nonce must not come back.
            1 => {
                let seg = only_segment(tmp.path());
                let last = *frames(&seg).last().expect("frame");
                let f = std::fs::OpenOptions::new()
                    .write(true)
                    .open(&seg)
                    .expect("open");
                f.set_len((last.0 + 50) as u64).expect("truncate");
                drop_last_checkpoint(tmp.path());
            }
            // The state file (boot counter) is lost: refused until it is restored.
            3 => {
                let state = tmp.path().join(STATE_FILE);
                let saved = std::fs::read(&state).expect("read state");
                std::fs::remove_file(&state).expect("rm state");
                let err = Ledger::open(cfg(tmp.path()), k.clone()).expect_err("lost state");
                assert!(err.to_string().contains("state.json is missing"), "{err}");
                std::fs::write(&state, saved).expect("restore state");
            }
            _ => {}
        }
    }
    let mut seen = HashSet::new();
    let mut total = 0;
    for (path, data) in all_file_bytes(tmp.path()) {
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if !(name.starts_with("seg-") || name.starts_with("torn-")) {
            continue;
        }
        let mut off = 0;
        loop {
            match next_frame(&data, off) {
                Next::Frame(f) => {
                    assert!(
                        seen.insert((f.header.key_id, f.header.nonce)),
                        "nonce reused: {:?}",
                        f.header.nonce
                    );
                    total += 1;
                    off = f.end;
                }
                Next::Torn if name.starts_with("torn-") => {
                    // The quarantined partial record still carries its header (and nonce).
                    let hdr = &data[off + 4..];
                    let nonce: [u8; 12] = hdr[22..34].try_into().expect("nonce");
                    assert!(seen.insert((1, nonce)), "torn nonce reused");
                    total += 1;
                    break;
                }
                _ => break,
            }
        }
    }
    assert_eq!(total, 5 * 40, "every encryption accounted for");
    verify_dir(tmp.path(), &k).expect("verify");
}

/// The bug this guards: with `state.json` lost, a start took its boot counter from the records
/// left in the newest segment. When the record cut off a torn tail (and kept in `torn-*.bin`)
/// was the first its boot wrote, no record left showed that boot, and the next start encrypted
/// a new record under the torn one's nonce. A lost state file now stops the start, changing
/// nothing, until it is restored or replaced under a data key that has encrypted nothing.
#[tokio::test]
async fn a_lost_state_file_refuses_to_open() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("ledger");
    let key_path = tmp.path().join("ledger-keys.json");
    Keyring::load_or_create(&key_path).expect("keys");
    let k = Keyring::load(&key_path).expect("keys");
    for n in [5, 1] {
        write_and_close(cfg(&dir), &k, n).await;
    }
    // A crash tore the second boot's only record.
    drop_last_checkpoint(&dir);
    let seg = only_segment(&dir);
    let (s, e, seq) = *frames(&seg).last().expect("frame");
    assert_eq!(seq, 6);
    cut_at(&seg, s + (e - s) / 2);
    let state = dir.join(STATE_FILE);
    let saved = std::fs::read(&state).expect("read state");
    std::fs::remove_file(&state).expect("lose state");

    let before = snapshot(&dir);
    let err = Ledger::open(cfg(&dir), k.clone()).expect_err("must refuse");
    let msg = err.to_string();
    for part in [
        &state.display().to_string(),
        "is missing",
        "nonce",
        "consentry keys rotate",
    ] {
        assert!(msg.contains(part), "{part:?} not in {msg}");
    }
    assert_eq!(snapshot(&dir), before, "a refused open changes nothing");

    // Restored, it opens, cuts the torn record and writes under a boot it has not used.
    std::fs::write(&state, &saved).expect("restore");
    write_and_close(cfg(&dir), &k, 1).await;
    let boots: Vec<u32> = {
        let data = std::fs::read(&seg).expect("read");
        let mut off = 0;
        let mut boots = Vec::new();
        while let Next::Frame(f) = next_frame(&data, off) {
            boots.push(f.header.boot());
            off = f.end;
        }
        boots
    };
    assert_eq!(boots, vec![1, 1, 1, 1, 1, 3]);

    // Lost for good: as the error says, a new data key, then a state written anew.
    std::fs::remove_file(&state).expect("lose state");
    Keyring::rotate(&key_path).expect("rotate");
    std::fs::write(&state, br#"{"boot":0,"key_uses":{}}"#).expect("write state");
    let k = Keyring::load(&key_path).expect("keys");
    let ledger = Ledger::open(cfg(&dir), k.clone()).expect("opens under the new key");
    write_n(&ledger, 1).await;
    ledger.shutdown().await;
    assert_eq!(verify_dir(&dir, &k).expect("verify").head_seq, 7);
}

fn drop_last_checkpoint(dir: &Path) {
    let p = dir.join(CHECKPOINT_FILE);
    let s = std::fs::read_to_string(&p).expect("read checkpoints");
    let mut lines: Vec<&str> = s.lines().collect();
    lines.pop();
    let mut out = lines.join("\n");
    if !out.is_empty() {
        out.push('\n');
    }
    std::fs::write(&p, out).expect("write checkpoints");
}

/// Records a crash left after the last checkpoint are signed when the ledger opens again, so a
/// stopped ledger's head is unsigned only between a crash and the next start.
#[tokio::test]
async fn reopening_after_a_crash_signs_the_head() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let k = keys();
    write_and_close(cfg(tmp.path()), &k, 5).await;
    drop_last_checkpoint(tmp.path());
    let report = verify_dir(tmp.path(), &k).expect("verifies");
    assert_eq!((report.head_seq, report.unsigned_tail), (5, 5));

    let ledger = Ledger::open(cfg(tmp.path()), k.clone()).expect("reopen");
    let signed = std::fs::read_to_string(tmp.path().join(CHECKPOINT_FILE)).expect("read");
    assert!(signed.contains("\"seq\":5,"), "{signed}");
    ledger.shutdown().await;
    let report = verify_dir(tmp.path(), &k).expect("verifies");
    assert_eq!((report.head_seq, report.unsigned_tail), (5, 0));
}

#[tokio::test]
async fn torn_tail_is_truncated_and_chain_verifies() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let k = keys();
    write_and_close(cfg(tmp.path()), &k, 20).await;

    // Simulate a crash in the middle of the last record's write, before its checkpoint.
    drop_last_checkpoint(tmp.path());
    let seg = only_segment(tmp.path());
    let last = *frames(&seg).last().expect("frame");
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&seg)
        .expect("open");
    let cut = last.0 + (last.1 - last.0) / 2;
    f.set_len(cut as u64).expect("truncate");
    drop(f);
    // A crash's doing, not tampering: verify says what it is and that the 19 before it hold.
    let report = verify_dir(tmp.path(), &k).expect("a torn tail is not a failed verification");
    assert_eq!((report.records, report.head_seq), (19, 19));
    assert_eq!(
        report.torn_tail,
        Some(TornTail {
            segment: seg.clone(),
            offset: last.0 as u64,
            bytes: (cut - last.0) as u64,
            seq: 20,
        })
    );

    let ledger = Ledger::open(cfg(tmp.path()), k.clone()).expect("reopen recovers");
    assert_eq!(ledger.durable_seq(), 19);
    let next = write_n(&ledger, 5).await;
    assert_eq!(next, vec![20, 21, 22, 23, 24]);
    ledger.shutdown().await;
    let report = verify_dir(tmp.path(), &k).expect("verify after recovery");
    assert_eq!((report.records, report.head_seq), (24, 24));
    assert_eq!(report.torn_tail, None);
    let quarantined = all_file_bytes(tmp.path())
        .into_iter()
        .filter(|(p, _)| p.to_string_lossy().contains("torn-"))
        .count();
    assert_eq!(quarantined, 1, "cut bytes are kept as evidence");
}

/// What verify lets pass as a torn tail is only what start cuts as one: a record cut short at
/// the end of the newest segment, past every signed checkpoint. A record cut short that a
/// checkpoint covers, one cut short in an older segment, bytes that are no record, and a
/// complete record altered all still fail.
#[tokio::test]
async fn only_a_record_cut_short_past_the_last_checkpoint_passes_as_torn() {
    let torn_at_end = |seg: &Path| {
        let mut data = std::fs::read(seg).expect("read");
        let (s, e, _) = frames(seg)[0];
        data.extend_from_within(s..s + (e - s) / 2);
        std::fs::write(seg, data).expect("write");
    };

    // Covered by the checkpoint the stop signed: cut, not torn.
    let tmp = tempfile::tempdir().expect("tempdir");
    let k = keys();
    write_and_close(cfg(tmp.path()), &k, 10).await;
    let seg = only_segment(tmp.path());
    let last = *frames(&seg).last().expect("frame");
    cut_at(&seg, last.0 + (last.1 - last.0) / 2);
    let err = verify_dir(tmp.path(), &k).expect_err("below a checkpoint");
    assert!(err.to_string().contains("covers seq 10"), "{err}");
    assert_eq!(tamper(err), (10, TamperKind::Truncated));
    assert!(
        Ledger::open(cfg(tmp.path()), k.clone()).is_err(),
        "start refuses it too"
    );

    // Bytes that are no record, past the last checkpoint.
    let tmp = tempfile::tempdir().expect("tempdir");
    write_and_close(cfg(tmp.path()), &k, 3).await;
    let seg = only_segment(tmp.path());
    let mut data = std::fs::read(&seg).expect("read");
    data.extend_from_slice(&[0xff; 40]);
    std::fs::write(&seg, data).expect("write");
    assert_eq!(
        tamper(verify_dir(tmp.path(), &k).expect_err("garbage")),
        (4, TamperKind::Modified)
    );

    // A complete last record altered, and a torn tail after it.
    let tmp = tempfile::tempdir().expect("tempdir");
    write_and_close(cfg(tmp.path()), &k, 3).await;
    drop_last_checkpoint(tmp.path());
    let seg = only_segment(tmp.path());
    let mut data = std::fs::read(&seg).expect("read");
    let (_, e, _) = frames(&seg)[2];
    data[e - 1] ^= 1;
    std::fs::write(&seg, data).expect("write");
    torn_at_end(&seg);
    assert_eq!(
        tamper(verify_dir(tmp.path(), &k).expect_err("altered")),
        (3, TamperKind::Modified)
    );

    // Cut short in a segment that is not the newest.
    let tmp = tempfile::tempdir().expect("tempdir");
    let small = LedgerConfig {
        segment_bytes: 2048,
        ..cfg(tmp.path())
    };
    write_and_close(small, &k, 30).await;
    drop_last_checkpoint(tmp.path());
    let segs = list_segments(tmp.path()).expect("list");
    assert!(segs.len() >= 3, "{segs:?}");
    torn_at_end(&segs[0].1);
    assert_eq!(
        tamper(verify_dir(tmp.path(), &k).expect_err("older segment")).1,
        TamperKind::Truncated
    );
}

#[tokio::test]
async fn torn_garbage_after_tail_is_cut() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let k = keys();
    write_and_close(cfg(tmp.path()), &k, 10).await;
    // A partially written frame appended after the last durable one.
    let seg = only_segment(tmp.path());
    let mut data = std::fs::read(&seg).expect("read");
    let (s, e, _) = frames(&seg)[3];
    let partial = data[s..s + (e - s) - 7].to_vec();
    data.extend_from_slice(&partial);
    std::fs::write(&seg, data).expect("write");
    let ledger = Ledger::open(cfg(tmp.path()), k.clone()).expect("reopen");
    write_n(&ledger, 2).await;
    ledger.shutdown().await;
    assert_eq!(verify_dir(tmp.path(), &k).expect("verify").head_seq, 12);
}

#[tokio::test]
async fn damage_covered_by_a_checkpoint_refuses_to_open() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let k = keys();
    write_and_close(cfg(tmp.path()), &k, 10).await;
    let seg = only_segment(tmp.path());
    let (s, _, _) = frames(&seg)[9];
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&seg)
        .expect("open");
    f.set_len((s + 30) as u64).expect("truncate");
    let err = Ledger::open(cfg(tmp.path()), k).expect_err("must refuse");
    assert_eq!(tamper(err), (10, TamperKind::Modified));
}

#[tokio::test]
async fn blind_index_lookup_and_no_clear_ids() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let k = keys();
    let ledger = Ledger::open(cfg(tmp.path()), k.clone()).expect("open");
    write_n(&ledger, 30).await;
    ledger
        .submit(share(ALICE, ALICE_DEVICE, "sleeplab", "sleep", 99))
        .expect("submit")
        .await
        .expect("durable");
    ledger
        .record_extract(ExtractRecord {
            actor: "support-desk".into(),
            user: ALICE.into(),
            what: "heart_rate".into(),
            purpose: "complaint".into(),
            time: Utc::now(),
        })
        .expect("extract")
        .await
        .expect("durable");

    let all = ledger
        .read_user(ALICE, &ReadFilter::default())
        .expect("read");
    assert_eq!(all.len(), 12);
    assert!(all.iter().all(|(_, e)| e.user() == ALICE));
    assert!(all.windows(2).all(|w| w[0].0 < w[1].0), "in seq order");
    assert!(matches!(all.last(), Some((_, Entry::Extract(_)))));
    let bob = ledger
        .read_user("bob", &ReadFilter::default())
        .expect("read");
    assert_eq!(bob.len(), 20);
    assert!(bob.iter().all(|(_, e)| e.user() == "bob"));
    assert!(ledger
        .read_user("carol", &ReadFilter::default())
        .expect("read")
        .is_empty());

    let f = ReadFilter {
        recipient: Some("sleeplab".into()),
        ..ReadFilter::default()
    };
    assert_eq!(ledger.read_user(ALICE, &f).expect("read").len(), 1);
    let f = ReadFilter {
        kind: Some("heart_rate".into()),
        after_seq: Some(10),
        limit: 2,
        ..ReadFilter::default()
    };
    let page = ledger.read_user(ALICE, &f).expect("read");
    assert_eq!(
        page.iter().map(|(s, _)| *s).collect::<Vec<_>>(),
        vec![13, 16]
    );
    let f = ReadFilter {
        to: Some(Utc::now() - TimeDelta::hours(1)),
        ..ReadFilter::default()
    };
    assert!(ledger.read_user(ALICE, &f).expect("read").is_empty());
    ledger.shutdown().await;

    for (path, bytes) in all_file_bytes(tmp.path()) {
        for id in [ALICE, ALICE_DEVICE, "bob-phone"] {
            assert!(
                !contains(&bytes, id.as_bytes()),
                "{id} found in clear in {}",
                path.display()
            );
        }
    }
}

#[tokio::test]
async fn verify_detects_flipped_byte() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let k = keys();
    write_and_close(cfg(tmp.path()), &k, 10).await;
    let seg = only_segment(tmp.path());
    let (s, _, seq) = frames(&seg)[4];
    let mut data = std::fs::read(&seg).expect("read");
    data[s + 4 + 98 + 3] ^= 0x01; // inside the ciphertext of record 5
    std::fs::write(&seg, data).expect("write");
    assert_eq!(seq, 5);
    let (bad, kind) = tamper(verify_dir(tmp.path(), &k).expect_err("detected"));
    assert_eq!((bad, kind), (5, TamperKind::Modified));
}

#[tokio::test]
async fn verify_detects_deleted_record() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let k = keys();
    write_and_close(cfg(tmp.path()), &k, 10).await;
    let seg = only_segment(tmp.path());
    let (s, e, _) = frames(&seg)[4];
    let mut data = std::fs::read(&seg).expect("read");
    data.drain(s..e);
    std::fs::write(&seg, data).expect("write");
    let (bad, kind) = tamper(verify_dir(tmp.path(), &k).expect_err("detected"));
    assert_eq!((bad, kind), (5, TamperKind::Removed));
}

#[tokio::test]
async fn verify_detects_swapped_pair() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let k = keys();
    write_and_close(cfg(tmp.path()), &k, 10).await;
    let seg = only_segment(tmp.path());
    let fr = frames(&seg);
    let data = std::fs::read(&seg).expect("read");
    let (a, b) = (fr[4], fr[5]);
    let mut out = data[..a.0].to_vec();
    out.extend_from_slice(&data[b.0..b.1]);
    out.extend_from_slice(&data[a.0..a.1]);
    out.extend_from_slice(&data[b.1..]);
    std::fs::write(&seg, out).expect("write");
    let (bad, kind) = tamper(verify_dir(tmp.path(), &k).expect_err("detected"));
    assert_eq!((bad, kind), (5, TamperKind::Reordered));
}

#[tokio::test]
async fn verify_detects_checkpoint_tampering_and_cut_tail() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let k = keys();
    write_and_close(cfg(tmp.path()), &k, 10).await;
    let report = verify_dir(tmp.path(), &k).expect("clean ledger verifies");
    // The checkpoint signed when the ledger was created (seq 0) and the one at shutdown.
    assert_eq!(
        (report.records, report.checkpoints, report.unsigned_tail),
        (10, 2, 0)
    );

    // Dropping whole records at the end is caught by the shutdown checkpoint.
    let seg = only_segment(tmp.path());
    let (s, _, _) = frames(&seg)[8];
    let original = std::fs::read(&seg).expect("read");
    std::fs::write(&seg, &original[..s]).expect("write");
    assert_eq!(
        tamper(verify_dir(tmp.path(), &k).expect_err("cut")),
        (9, TamperKind::Truncated)
    );
    std::fs::write(&seg, &original).expect("restore");

    // The checkpoint file removed: caught, although the chain itself is whole.
    let p = tmp.path().join(CHECKPOINT_FILE);
    let saved = std::fs::read_to_string(&p).expect("read");
    std::fs::remove_file(&p).expect("remove");
    assert_eq!(
        tamper(verify_dir(tmp.path(), &k).expect_err("no checkpoints")),
        (0, TamperKind::CheckpointInvalid)
    );
    // Every checkpoint but the first removed, and the last record cut at its boundary: the
    // chain cannot show that cut, but the report names the records no checkpoint covers.
    let genesis = saved.lines().next().expect("first checkpoint");
    std::fs::write(&p, format!("{genesis}\n")).expect("write");
    let (last, _, _) = frames(&seg)[9];
    std::fs::write(&seg, &original[..last]).expect("write");
    let report = verify_dir(tmp.path(), &k).expect("verifies, with an unsigned tail");
    assert_eq!((report.head_seq, report.unsigned_tail), (9, 9));
    std::fs::write(&seg, &original).expect("restore");
    std::fs::write(&p, &saved).expect("restore");

    // A forged checkpoint does not verify.
    let s = std::fs::read_to_string(&p).expect("read");
    std::fs::write(&p, s.replace("\"seq\":10", "\"seq\":11")).expect("write");
    assert_eq!(
        tamper(verify_dir(tmp.path(), &k).expect_err("forged")),
        (11, TamperKind::CheckpointInvalid)
    );
}

#[tokio::test]
async fn key_rotation_keeps_old_records_readable() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let key_path = tmp.path().join("ledger-keys.json");
    let dir = tmp.path().join("ledger");
    let k1 = Keyring::load_or_create(&key_path).expect("create keys");
    let ledger = Ledger::open(cfg(&dir), k1).expect("open");
    write_n(&ledger, 6).await;
    ledger.shutdown().await;

    let new_id = Keyring::rotate(&key_path).expect("rotate");
    assert_eq!(new_id, KeyId(2));
    let k2 = Keyring::load_or_create(&key_path).expect("reload");
    assert_eq!(k2.active_key_id(), KeyId(2));
    let ledger = Ledger::open(cfg(&dir), k2.clone()).expect("reopen");
    write_n(&ledger, 6).await;
    let all = ledger
        .read_user(ALICE, &ReadFilter::default())
        .expect("read");
    assert_eq!(
        all.iter().map(|(s, _)| *s).collect::<Vec<_>>(),
        vec![1, 4, 7, 10]
    );
    ledger.shutdown().await;

    let key_ids: HashSet<u32> = {
        let data = std::fs::read(only_segment(&dir)).expect("read");
        let mut off = 0;
        let mut ids = HashSet::new();
        while let Next::Frame(f) = next_frame(&data, off) {
            ids.insert(f.header.key_id);
            off = f.end;
        }
        ids
    };
    assert_eq!(key_ids, HashSet::from([1, 2]));
    assert_eq!(verify_dir(&dir, &k2).expect("verify").records, 12);
}

#[cfg(unix)]
#[test]
fn key_file_is_owner_only_and_secrets_stay_out_of_debug() {
    use std::os::unix::fs::PermissionsExt;
    let tmp = tempfile::tempdir().expect("tempdir");
    let path = tmp.path().join("keys.json");
    let k = Keyring::load_or_create(&path).expect("create");
    let mode = std::fs::metadata(&path).expect("stat").permissions().mode();
    assert_eq!(mode & 0o777, 0o600);

    let doc: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&path).expect("read")).expect("json");
    let dbg = format!("{k:?}");
    for secret in [
        doc["blind_key"].as_str(),
        doc["signing_key"].as_str(),
        doc["data_keys"][0]["key"].as_str(),
    ] {
        let secret = secret.expect("secret present");
        assert!(!dbg.contains(secret), "secret leaked into Debug: {dbg}");
    }

    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    assert!(matches!(
        Keyring::load_or_create(&path),
        Err(LedgerError::InsecureKeyFile { .. })
    ));

    // The same document through the environment.
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    let env_doc = Keyring::export_env_document(&path).expect("export");
    std::env::set_var(KEYS_ENV, env_doc);
    let from_env = Keyring::from_env().expect("parse").expect("present");
    std::env::remove_var(KEYS_ENV);
    assert_eq!(from_env.verifying_key(), k.verifying_key());
    assert_eq!(from_env.blind_index("x"), k.blind_index("x"));
}

#[tokio::test]
async fn retention_purges_old_segments_and_verification_passes() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let k = keys();
    let c = small_with_retention(tmp.path());
    let ledger = Ledger::open(c.clone(), k.clone()).expect("open");
    let old = Utc::now() - TimeDelta::days(3);
    write_at(&ledger, [old; 30]).await;
    write_n(&ledger, 12).await;
    ledger.shutdown().await;

    let segs = list_segments(tmp.path()).expect("list");
    // 30 records of ~250 bytes fill several 2 KiB segments; the closed ones were purged.
    assert!(segs[0].0 > 1, "old segments were purged: {segs:?}");
    assert!(!std::path::Path::new(&super::segment::segment_path(tmp.path(), 1)).exists());
    let report = verify_dir(tmp.path(), &k).expect("verify after purge");
    assert_eq!(report.anchor_seq, Some(segs[0].0 - 1));
    assert_eq!(report.head_seq, 42);

    // Reopen and keep going; old data is gone for readers too.
    let ledger = Ledger::open(c, k.clone()).expect("reopen");
    write_n(&ledger, 3).await;
    let alice = ledger
        .read_user(ALICE, &ReadFilter::default())
        .expect("read");
    assert!(alice.iter().all(|(s, _)| *s >= segs[0].0));
    let old_left = alice.iter().filter(|(_, e)| e.time() == old).count();
    assert!(old_left < 30, "old records in closed segments are gone");
    ledger.shutdown().await;
    assert_eq!(verify_dir(tmp.path(), &k).expect("verify").head_seq, 45);

    // Removing a segment without an anchoring checkpoint is still caught.
    let segs = list_segments(tmp.path()).expect("list");
    std::fs::remove_file(&segs[1].1).expect("rm");
    assert_eq!(
        tamper(verify_dir(tmp.path(), &k).expect_err("gap")).1,
        TamperKind::Removed
    );
}

/// Deleting past retention is upkeep: when it fails (the process out of
/// file descriptors for a moment, say) the ledger keeps taking records and
/// deletes at a later try, rather than failing closed for good.
#[tokio::test]
async fn a_failed_purge_does_not_close_the_ledger() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let k = keys();
    let c = small_with_retention(tmp.path());
    let fault = tmp.path().join("test-fail-purge");
    std::fs::write(&fault, b"").expect("fault");
    let ledger = Ledger::open(c, k.clone()).expect("open");
    let old = Utc::now() - TimeDelta::days(3);
    // Every durable ack here means the ledger still takes records while
    // each segment it closes sets a purge going that fails.
    write_at(&ledger, [old; 30]).await;
    assert!(ledger.is_healthy());
    assert_eq!(
        list_segments(tmp.path()).expect("list")[0].0,
        1,
        "nothing was deleted while deleting failed"
    );
    std::fs::remove_file(&fault).expect("clear fault");
    // The next segment closed sets the next try going.
    write_at(&ledger, [old; 10]).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while list_segments(tmp.path()).expect("list")[0].0 == 1 {
        assert!(std::time::Instant::now() < deadline, "never purged");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    write_n(&ledger, 12).await;
    ledger.shutdown().await;
    verify_dir(tmp.path(), &k).expect("verify after the late purge");
}

/// At a low rate a segment never fills, and only closed segments are purged: the active one is
/// closed once its oldest record is a day old, so retention still deletes on time.
#[tokio::test]
async fn retention_forgets_on_time_at_a_low_rate() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let k = keys();
    let c = LedgerConfig {
        retention: Some(Duration::from_secs(24 * 3600)),
        ..cfg(tmp.path())
    };
    assert!(
        c.segment_bytes >= 1 << 20,
        "a segment these records cannot fill"
    );
    let ledger = Ledger::open(c.clone(), k.clone()).expect("open");
    let old = Utc::now() - TimeDelta::days(3);
    write_at(&ledger, [old; 5]).await;
    write_n(&ledger, 3).await;
    ledger.shutdown().await;

    let ledger = Ledger::open(c, k.clone()).expect("reopen");
    let alice = ledger
        .read_user(ALICE, &ReadFilter::default())
        .expect("read");
    assert!(alice.iter().all(|(_, e)| e.time() != old), "{alice:?}");
    assert_eq!(alice.len(), 1, "the fresh record stays");
    ledger.shutdown().await;
    assert!(!std::path::Path::new(&super::segment::segment_path(tmp.path(), 1)).exists());
    verify_dir(tmp.path(), &k).expect("verify after purge");
}

/// Five records a day old past retention, then a reopen with retention that closes their
/// segment for its age and purges it: every record gone, the newest segment empty.
async fn purge_everything(dir: &Path, k: &Keyring) -> LedgerConfig {
    let c = LedgerConfig {
        retention: Some(Duration::from_secs(24 * 3600)),
        ..cfg(dir)
    };
    let ledger = Ledger::open(c.clone(), k.clone()).expect("open");
    write_at(&ledger, [Utc::now() - TimeDelta::days(3); 5]).await;
    ledger.shutdown().await;
    let ledger = Ledger::open(c.clone(), k.clone()).expect("reopen");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while segment_path(dir, 1).exists() {
        assert!(std::time::Instant::now() < deadline, "never purged");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    ledger.shutdown().await;
    let segs = list_segments(dir).expect("list");
    assert_eq!(segs.len(), 1, "{segs:?}");
    assert_eq!(segs[0].0, 6);
    assert_eq!(std::fs::metadata(&segs[0].1).expect("stat").len(), 0);
    c
}

/// A quiet gateway's ledger, every record purged by retention, failed `verify` ("a signed
/// checkpoint covers seq 5 but the chain ends at 0") while the server opened it: with no record
/// on disk, verify took the head to be seq 0 and ignored the newest segment's name.
#[tokio::test]
async fn a_ledger_whose_every_record_was_purged_verifies_and_reopens() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let k = keys();
    let c = purge_everything(tmp.path(), &k).await;
    let purged = |r: VerifyReport| {
        assert_eq!(
            (
                r.records,
                r.first_seq,
                r.head_seq,
                r.anchor_seq,
                r.unsigned_tail
            ),
            (0, None, 5, Some(5), 0),
            "{r:?}"
        );
    };
    purged(verify_dir(tmp.path(), &k).expect("verify a fully purged ledger"));

    // A restart changes nothing: the head was signed before the purge.
    let ledger = Ledger::open(c.clone(), k.clone()).expect("restart");
    assert_eq!(ledger.durable_seq(), 5);
    ledger.shutdown().await;
    purged(verify_dir(tmp.path(), &k).expect("verify after a restart"));

    // New records continue the chain from the checkpoint.
    let ledger = Ledger::open(c, k.clone()).expect("restart");
    assert_eq!(write_n(&ledger, 2).await, vec![6, 7]);
    ledger.shutdown().await;
    let r = verify_dir(tmp.path(), &k).expect("verify after new records");
    assert_eq!(
        (r.records, r.first_seq, r.head_seq, r.anchor_seq),
        (2, Some(6), 7, Some(5))
    );
}

/// What a purge cannot leave, both verify and start refuse, on a fully purged ledger as on one
/// with records.
#[tokio::test]
async fn verify_and_start_agree_on_a_fully_purged_ledger_changed_afterwards() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let k = keys();
    let c = purge_everything(tmp.path(), &k).await;
    let saved = snapshot(tmp.path());
    let restore = || {
        for (p, _) in snapshot(tmp.path()) {
            std::fs::remove_file(p).expect("rm");
        }
        for (p, b) in &saved {
            std::fs::write(p, b).expect("restore");
        }
    };
    let empty = segment_path(tmp.path(), 6);
    let cp = tmp.path().join(CHECKPOINT_FILE);
    let only_genesis = || {
        let text = std::fs::read_to_string(&cp).expect("read");
        let keep: String = text
            .lines()
            .filter(|l| serde_json::from_str::<serde_json::Value>(l).expect("json")["seq"] == 0)
            .map(|l| format!("{l}\n"))
            .collect();
        std::fs::write(&cp, keep).expect("write");
    };
    let variants: [(&str, &dyn Fn()); 4] = [
        ("the checkpoint at the cut removed", &only_genesis),
        ("the empty segment renamed above the cut", &|| {
            std::fs::rename(&empty, segment_path(tmp.path(), 9)).expect("mv")
        }),
        ("the empty segment renamed below the cut", &|| {
            std::fs::rename(&empty, segment_path(tmp.path(), 3)).expect("mv")
        }),
        ("the empty segment removed", &|| {
            std::fs::remove_file(&empty).expect("rm")
        }),
    ];
    for (what, change) in variants {
        restore();
        verify_dir(tmp.path(), &k).expect("the purged ledger verifies");
        change();
        let v = verify_dir(tmp.path(), &k);
        assert!(
            matches!(v, Err(LedgerError::Tampered { .. })),
            "{what}: verify {v:?}"
        );
        let o = Ledger::open(c.clone(), k.clone());
        assert!(
            matches!(o, Err(LedgerError::Tampered { .. })),
            "{what}: open {:?}",
            o.map(|_| ())
        );
    }
}

/// Segments are named for their first record and purged whole, oldest first: an empty newest
/// segment whose name skips records after the chain's end is records removed. Start refused it
/// and verify, looking at records only, passed it.
#[tokio::test]
async fn a_gap_before_an_empty_newest_segment_fails_verify_as_it_fails_start() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let k = keys();
    let small = LedgerConfig {
        segment_bytes: 2048,
        ..cfg(tmp.path())
    };
    write_and_close(small.clone(), &k, 20).await;
    verify_dir(tmp.path(), &k).expect("verifies");
    std::fs::write(segment_path(tmp.path(), 22), b"").expect("empty segment past a gap");
    assert_eq!(
        tamper(verify_dir(tmp.path(), &k).expect_err("gap")),
        (21, TamperKind::Removed)
    );
    assert_eq!(
        tamper(Ledger::open(small, k).expect_err("gap")),
        (21, TamperKind::Removed)
    );
}

/// A quiet gateway's ledger, every record purged, then run with its clock years behind (the
/// reviewer used faketime): the records it wrote, stamped years ago, were purged within seconds
/// once the clock was right. Their headers now carry the latest time the ledger had seen (the
/// purge's checkpoint), so they are kept for the retention period from then; their own time is
/// left as stamped, and the clock's lag is reported meanwhile.
#[tokio::test]
async fn records_stamped_by_a_clock_set_back_are_not_purged_early() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let k = keys();
    purge_everything(tmp.path(), &k).await;
    let ledger = Ledger::open(small_with_retention(tmp.path()), k.clone()).expect("reopen");
    let back = TimeDelta::days(2200);
    ledger.shared().clock_skew_us.store(
        -back.num_microseconds().expect("µs"),
        std::sync::atomic::Ordering::Relaxed,
    );
    let behind = Utc::now() - back;
    write_at(&ledger, [behind; 20]).await;
    let lag = ledger
        .shared()
        .clock_behind_us
        .load(std::sync::atomic::Ordering::Relaxed);
    assert!(
        lag > (back - TimeDelta::hours(1)).num_microseconds().unwrap(),
        "{lag}"
    );
    // The clock is set right; new records close segments, and each closing purges.
    ledger
        .shared()
        .clock_skew_us
        .store(0, std::sync::atomic::Ordering::Relaxed);
    write_n(&ledger, 12).await;
    assert_eq!(
        ledger
            .shared()
            .clock_behind_us
            .load(std::sync::atomic::Ordering::Relaxed),
        0
    );
    ledger.shutdown().await;
    assert!(
        segment_path(tmp.path(), 6).exists(),
        "{:?}",
        list_segments(tmp.path())
    );
    let ledger = Ledger::open(cfg(tmp.path()), k.clone()).expect("reopen");
    let kept = ledger
        .read_user(ALICE, &ReadFilter::default())
        .expect("read")
        .into_iter()
        .filter(|(_, e)| e.time() == behind)
        .count();
    assert_eq!(kept, 20, "records written minutes ago were purged");
    ledger.shutdown().await;
    verify_dir(tmp.path(), &k).expect("verify");
}

#[tokio::test]
async fn retention_reads_segments_from_an_earlier_run_off_the_writer() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let k = keys();
    let small = LedgerConfig {
        segment_bytes: 2048,
        ..cfg(tmp.path())
    };
    // Without retention, old records fill several closed segments.
    let ledger = Ledger::open(small.clone(), k.clone()).expect("open");
    let old = Utc::now() - TimeDelta::days(3);
    write_at(&ledger, [old; 30]).await;
    ledger.shutdown().await;
    let before = list_segments(tmp.path()).expect("list");
    assert!(before.len() >= 3, "several segments: {before:?}");
    // Damage the newest closed segment: it and everything after it stay.
    let damaged = &before[before.len() - 2];
    let mut bytes = std::fs::read(&damaged.1).expect("read");
    bytes.truncate(bytes.len() - 5);
    std::fs::write(&damaged.1, &bytes).expect("write");

    // Reopened with retention, this writer closed none of them: the scanner reads them, and
    // its answer (not a minute's tick) sets the purge going.
    let ledger = Ledger::open(
        LedgerConfig {
            retention: Some(Duration::from_secs(24 * 3600)),
            ..small
        },
        k.clone(),
    )
    .expect("reopen");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let purged = loop {
        let now = list_segments(tmp.path()).expect("list");
        if now[0].0 == damaged.0 {
            break now;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "segments before the damaged one were not purged: {now:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    // The segment after it, closed by this writer for its age, stays behind the damage too,
    // with the new active one.
    assert_eq!(
        purged.len(),
        3,
        "the damaged segment, the one after it and a new active one stay: {purged:?}"
    );
    ledger.shutdown().await;
    // The checkpoint signed before each deletion anchors the chain at the gap.
    let report = verify_dir(tmp.path(), &k);
    assert!(
        matches!(report, Err(LedgerError::Tampered { .. })),
        "the damage itself is still reported: {report:?}"
    );
}

#[test]
fn segment_summary_reads_newest_time_last_record_and_damage() {
    use super::purge::Summary;
    let tmp = tempfile::tempdir().expect("tempdir");
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let ledger = Ledger::open(cfg(tmp.path()), keys()).expect("open");
    let t0 = Utc::now() - TimeDelta::days(1);
    // Times out of order: the newest need not be the last.
    rt.block_on(write_at(
        &ledger,
        [5, 1, 3].map(|h| t0 - TimeDelta::hours(h)),
    ));
    rt.block_on(ledger.shutdown());
    let seg = &list_segments(tmp.path()).expect("list")[0].1;
    let data = std::fs::read(seg).expect("read");
    let s = Summary::of(&data);
    assert!(s.clean);
    assert_eq!(
        s.newest_us,
        (t0 - TimeDelta::hours(1)).timestamp_micros(),
        "newest of the three"
    );
    let mut off = 0;
    let mut last = None;
    while let Next::Frame(f) = next_frame(&data, off) {
        off = f.end;
        last = Some((f.header.seq, f.hash()));
    }
    assert_eq!(s.last, last);
    assert_eq!(s.last.map(|l| l.0), Some(3));

    let torn = Summary::of(&data[..data.len() - 1]);
    assert!(!torn.clean);
    assert_eq!(Summary::of(&[]).last, None);
    assert!(Summary::of(&[]).clean);
}

#[tokio::test]
async fn fails_closed_on_enospc() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let ledger = Ledger::open(cfg(tmp.path()), keys()).expect("open");
    write_n(&ledger, 3).await;
    assert!(ledger.is_healthy());
    ledger
        .shared()
        .fault_dev_full
        .store(true, std::sync::atomic::Ordering::SeqCst);
    let d = ledger
        .submit(share(ALICE, ALICE_DEVICE, "fitcoach", "heart_rate", 1))
        .expect("queued before the failure is known");
    assert!(matches!(d.await, Err(LedgerError::Unhealthy(_))));
    assert!(!ledger.is_healthy());
    assert!(matches!(
        ledger.submit(share(ALICE, ALICE_DEVICE, "fitcoach", "heart_rate", 2)),
        Err(LedgerError::Unhealthy(_))
    ));
    ledger.shutdown().await;
}

#[tokio::test]
async fn a_ticket_is_durable_once_its_record_and_all_before_it_are() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let k = keys();
    let ledger = Ledger::open(cfg(tmp.path()), k.clone()).expect("open");
    let records: Vec<ShareRecord> = (0..50)
        .map(|i| share(ALICE, ALICE_DEVICE, "fitcoach", "heart_rate", i))
        .collect();
    let tickets: Vec<Ticket> = records
        .iter()
        .map(|r| ledger.queue_share(&r.as_ref()).expect("queue"))
        .collect();
    assert!(tickets.windows(2).all(|w| w[0] < w[1]), "{tickets:?}");
    let last = *tickets.last().expect("tickets");
    ledger.durable(last).await.expect("durable");
    // Every earlier ticket is durable with the last one, without a wait.
    assert!(tickets.iter().all(|&t| ledger.is_durable(t)));
    let read = ledger
        .read_user(ALICE, &ReadFilter::default())
        .expect("read");
    assert_eq!(read.len(), 50);
    for ((_, entry), want) in read.iter().zip(&records) {
        match entry {
            Entry::Share(got) => {
                assert_eq!(got.payload_digest, want.payload_digest);
                // An empty creator is filled from the configuration, as `submit` does.
                assert_eq!(got.creator, "consentry");
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    ledger.shutdown().await;
    verify_dir(tmp.path(), &k).expect("verify");
}

#[tokio::test]
async fn a_ticket_fails_when_the_ledger_fails_and_queuing_stops() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let ledger = Ledger::open(cfg(tmp.path()), keys()).expect("open");
    let before = share(ALICE, ALICE_DEVICE, "fitcoach", "heart_rate", 0);
    let kept = ledger.queue_share(&before.as_ref()).expect("queue");
    ledger.durable(kept).await.expect("durable");
    ledger
        .shared()
        .fault_dev_full
        .store(true, std::sync::atomic::Ordering::SeqCst);
    let r = share(ALICE, ALICE_DEVICE, "fitcoach", "heart_rate", 1);
    let lost = ledger
        .queue_share(&r.as_ref())
        .expect("queued before the failure is known");
    assert!(matches!(
        ledger.durable(lost).await,
        Err(LedgerError::Unhealthy(_))
    ));
    assert!(!ledger.is_durable(lost));
    // What was durable before the failure stays so.
    ledger.durable(kept).await.expect("still durable");
    assert!(matches!(
        ledger.queue_share(&r.as_ref()),
        Err(LedgerError::Unhealthy(_))
    ));
    ledger.shutdown().await;
}

#[tokio::test]
async fn tickets_queued_before_shutdown_are_written_and_later_ones_refused() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let ledger = Ledger::open(cfg(tmp.path()), keys()).expect("open");
    let other = ledger.clone();
    let r = share(ALICE, ALICE_DEVICE, "fitcoach", "heart_rate", 0);
    let tickets: Vec<Ticket> = (0..20)
        .map(|_| ledger.queue_share(&r.as_ref()).expect("queue"))
        .collect();
    let waiter = {
        let other = other.clone();
        let last = *tickets.last().expect("tickets");
        tokio::spawn(async move { other.durable(last).await })
    };
    ledger.shutdown().await;
    waiter.await.expect("join").expect("written at shutdown");
    assert!(matches!(
        other.queue_share(&r.as_ref()),
        Err(LedgerError::Closed)
    ));
}

#[tokio::test]
async fn fails_closed_when_the_directory_is_replaced() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("ledger");
    let c = LedgerConfig {
        segment_bytes: 1024,
        ..cfg(&dir)
    };
    let ledger = Ledger::open(c, keys()).expect("open");
    write_n(&ledger, 1).await;
    // Root ignores permission bits, so replace the directory itself: creating the next segment
    // then fails with a real I/O error from the kernel.
    std::fs::rename(&dir, tmp.path().join("moved")).expect("move dir");
    std::fs::write(&dir, b"not a directory").expect("replace");
    let mut failed = false;
    for i in 0..20 {
        match ledger.submit(share("bob", "bob-phone", "fitcoach", "steps", i)) {
            Ok(d) => {
                if d.await.is_err() {
                    failed = true;
                }
            }
            Err(LedgerError::Unhealthy(_)) => {
                failed = true;
                break;
            }
            Err(e) => panic!("unexpected error {e:?}"),
        }
    }
    assert!(failed, "an append failed");
    assert!(!ledger.is_healthy());
    ledger.shutdown().await;
}

#[tokio::test]
async fn blocked_counts_are_aggregated_flushed_and_readable() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let k = keys();
    let c = LedgerConfig {
        blocked_flush_every: Duration::from_millis(100),
        ..cfg(tmp.path())
    };
    let ledger = Ledger::open(c.clone(), k.clone()).expect("open");
    for _ in 0..5 {
        ledger.record_blocked(ALICE, "fitcoach", "heart_rate", "no-consent");
    }
    ledger.record_blocked(ALICE, "fitcoach", "heart_rate", "expired");
    ledger.record_blocked("bob", "fitcoach", "heart_rate", "no-consent");

    // Periodic flush while running.
    let mut flushed = Vec::new();
    for _ in 0..50 {
        tokio::time::sleep(Duration::from_millis(50)).await;
        flushed = ledger
            .read_user(ALICE, &ReadFilter::default())
            .expect("read");
        if flushed.len() == 2 {
            break;
        }
    }
    let mut counts: Vec<(String, u64)> = flushed
        .iter()
        .map(|(_, e)| match e {
            Entry::Blocked(b) => (b.reason.clone(), b.count),
            other => panic!("unexpected {other:?}"),
        })
        .collect();
    counts.sort();
    assert_eq!(
        counts,
        vec![("expired".to_string(), 1), ("no-consent".to_string(), 5)]
    );

    // Flushed at shutdown too.
    ledger.record_blocked(ALICE, "fitcoach", "heart_rate", "no-consent");
    ledger.shutdown().await;
    let ledger = Ledger::open(c, k.clone()).expect("reopen");
    let total: u64 = ledger
        .read_user(ALICE, &ReadFilter::default())
        .expect("read")
        .iter()
        .map(|(_, e)| match e {
            Entry::Blocked(b) => b.count,
            _ => 0,
        })
        .sum();
    assert_eq!(total, 7);
    let bob = ledger
        .read_user("bob", &ReadFilter::default())
        .expect("read");
    assert_eq!(bob.len(), 1);
    ledger.shutdown().await;
    verify_dir(tmp.path(), &k).expect("verify");
}

#[tokio::test]
async fn checkpoints_every_n_and_closed_after_shutdown() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let k = keys();
    let c = LedgerConfig {
        checkpoint_every: 10,
        ..cfg(tmp.path())
    };
    let ledger = Ledger::open(c, k.clone()).expect("open");
    let other = ledger.clone();
    for _ in 0..5 {
        write_n(&ledger, 10).await;
    }
    ledger.shutdown().await;
    assert!(matches!(
        other.submit(share(ALICE, ALICE_DEVICE, "fitcoach", "heart_rate", 0)),
        Err(LedgerError::Closed)
    ));
    let report = verify_dir(tmp.path(), &k).expect("verify");
    assert!(report.checkpoints >= 5);
    assert_eq!(report.head_seq, 50);
}

#[test]
fn wrong_keyring_is_refused_not_mistaken_for_damage() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let ledger = Ledger::open(cfg(tmp.path()), keys()).expect("open");
    ledger
        .submit(share(ALICE, ALICE_DEVICE, "fitcoach", "heart_rate", 0))
        .expect("submit")
        .wait_blocking()
        .expect("durable");
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("rt");
    rt.block_on(ledger.shutdown());
    assert!(matches!(
        Ledger::open(cfg(tmp.path()), keys()),
        Err(LedgerError::WrongKeys(_))
    ));
}

const KILL9_DIR: &str = "CONSENTRY_LEDGER_TEST_KILL9_DIR";

/// Child half of `survives_kill_9`: appends until killed, printing each durable watermark.
#[tokio::test]
#[ignore = "run by survives_kill_9 in a child process"]
async fn kill9_child_process() {
    use std::io::Write;
    let Ok(dir) = std::env::var(KILL9_DIR) else {
        return;
    };
    let dir = PathBuf::from(dir);
    let k = Keyring::load_or_create(&dir.join("keys.json")).expect("keys");
    let ledger = Ledger::open(cfg(&dir.join("ledger")), k).expect("open");
    loop {
        let seqs = write_n(&ledger, 200).await;
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "durable {}", seqs.last().copied().unwrap_or(0));
        let _ = out.flush();
    }
}

#[cfg(unix)]
#[tokio::test]
async fn survives_kill_9() {
    use std::io::BufRead;
    let tmp = tempfile::tempdir().expect("tempdir");
    let exe = std::env::current_exe().expect("test binary");
    let mut child = std::process::Command::new(exe)
        .args([
            "--exact",
            "ledger::tests::kill9_child_process",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(KILL9_DIR, tmp.path())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn child");
    let stdout = child.stdout.take().expect("stdout");
    let mut acked = 0u64;
    for line in std::io::BufReader::new(stdout).lines() {
        let line = line.expect("line");
        if let Some(n) = line.strip_prefix("durable ") {
            acked = n.trim().parse().expect("seq");
            if acked >= 5_000 {
                break;
            }
        }
    }
    child.kill().expect("SIGKILL");
    let _ = child.wait();
    assert!(acked >= 5_000);

    let k = Keyring::load_or_create(&tmp.path().join("keys.json")).expect("keys");
    let dir = tmp.path().join("ledger");
    let ledger = Ledger::open(cfg(&dir), k.clone()).expect("recover");
    assert!(
        ledger.durable_seq() >= acked,
        "acknowledged seq {acked} lost"
    );
    ledger.shutdown().await;
    let report = verify_dir(&dir, &k).expect("verify after kill -9");
    assert!(report.head_seq >= acked);
}

/// Every file's bytes, but `LOCK` (opening takes it): what a refused open must leave as it was.
fn snapshot(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut files: Vec<_> = all_file_bytes(dir)
        .into_iter()
        .filter(|(p, _)| !p.ends_with("LOCK"))
        .collect();
    files.sort();
    files
}

fn cut_at(seg: &Path, len: usize) {
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(seg)
        .expect("open");
    f.set_len(len as u64).expect("truncate");
}

/// A segment cut cleanly at a record boundary below what a signed checkpoint covers (a backup
/// of it restored beside newer checkpoints): `verify` called it truncated, but opening took the
/// shorter chain and wrote new records under the lost sequence numbers.
#[tokio::test]
async fn a_chain_cut_below_a_signed_checkpoint_refuses_to_open_and_writes_nothing() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let k = keys();
    write_and_close(cfg(tmp.path()), &k, 10).await;
    let seg = only_segment(tmp.path());
    cut_at(&seg, frames(&seg)[7].0);
    let before = snapshot(tmp.path());
    let err = Ledger::open(cfg(tmp.path()), k.clone()).expect_err("must refuse");
    let msg = err.to_string();
    assert!(msg.contains("covers seq 10 but the chain"), "{msg}");
    assert_eq!(tamper(err), (8, TamperKind::Truncated));
    assert_eq!(
        snapshot(tmp.path()),
        before,
        "a refused open writes nothing"
    );
    // As verify says.
    assert_eq!(
        tamper(verify_dir(tmp.path(), &k).expect_err("cut")),
        (8, TamperKind::Truncated)
    );
}

/// The same when whole segments are gone: the newest one left ends below the checkpoint, or
/// an older one ends short of the newest.
#[tokio::test]
async fn missing_segments_below_a_signed_checkpoint_refuse_to_open() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let k = keys();
    let small = LedgerConfig {
        segment_bytes: 2048,
        ..cfg(tmp.path())
    };
    write_and_close(small.clone(), &k, 40).await;
    let segs = list_segments(tmp.path()).expect("list");
    assert!(segs.len() >= 3, "{segs:?}");

    let (_, newest) = segs.last().expect("a segment");
    let saved = std::fs::read(newest).expect("read");
    std::fs::remove_file(newest).expect("remove");
    let before = snapshot(tmp.path());
    let (_, kind) = tamper(Ledger::open(small.clone(), k.clone()).expect_err("must refuse"));
    assert_eq!(kind, TamperKind::Truncated);
    assert_eq!(snapshot(tmp.path()), before);
    std::fs::write(newest, saved).expect("restore");

    // The newest segment empty (as rotation leaves it), the history before it signed (as
    // retention signs it before purging), and the segment before it cut short: the checkpoint
    // that anchors a purged segment must not paper over records lost from one still there.
    let (first, _) = segs[segs.len() - 1];
    std::fs::write(segment_path(tmp.path(), first), b"").expect("empty newest");
    let (_, older) = &segs[segs.len() - 2];
    let data = std::fs::read(older).expect("read");
    let (last_start, _, last_seq) = *frames(older).last().expect("frame");
    let Next::Frame(f) = next_frame(&data, last_start) else {
        panic!("no frame")
    };
    assert_eq!(last_seq, first - 1);
    let cp = tmp.path().join(CHECKPOINT_FILE);
    let genesis = std::fs::read_to_string(&cp).expect("read");
    let genesis = genesis.lines().next().expect("seq 0");
    std::fs::write(&cp, format!("{genesis}\n")).expect("write");
    let mut log = checkpoint::CheckpointLog::open(tmp.path(), None).expect("log");
    log.append(&checkpoint::Checkpoint::sign(&k, last_seq, f.hash(), 0))
        .expect("sign");
    drop(log);
    verify_dir(tmp.path(), &k).expect("consistent so far");
    cut_at(older, last_start);
    let before = snapshot(tmp.path());
    let (seq, kind) = tamper(Ledger::open(small, k).expect_err("must refuse"));
    assert_eq!((seq, kind), (last_seq, TamperKind::Removed));
    assert_eq!(snapshot(tmp.path()), before);
}

/// A removed (or emptied) checkpoint file let a cut tail pass as a torn one: records were
/// quarantined and the rest opened as if nothing were missing.
#[tokio::test]
async fn records_without_a_checkpoint_file_refuse_to_open() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let k = keys();
    write_and_close(cfg(tmp.path()), &k, 10).await;
    let cp = tmp.path().join(CHECKPOINT_FILE);
    let seg = only_segment(tmp.path());
    let (s, e, _) = frames(&seg)[4];
    cut_at(&seg, s + (e - s) / 2);
    for emptied in [false, true] {
        if emptied {
            std::fs::write(&cp, b"").expect("empty");
        } else {
            std::fs::remove_file(&cp).expect("remove");
        }
        let before = snapshot(tmp.path());
        let err = Ledger::open(cfg(tmp.path()), k.clone()).expect_err("must refuse");
        assert!(err.to_string().contains("checkpoints.jsonl"), "{err}");
        assert_eq!(tamper(err), (0, TamperKind::CheckpointInvalid));
        assert_eq!(snapshot(tmp.path()), before, "nothing cut or quarantined");
    }

    // A crash at the first start, after the first segment was created and before the first
    // checkpoint was signed, leaves no checkpoint and no record: that opens.
    let fresh = tempfile::tempdir().expect("tempdir");
    Ledger::open(cfg(fresh.path()), k.clone())
        .expect("create")
        .shutdown()
        .await;
    std::fs::remove_file(fresh.path().join(CHECKPOINT_FILE)).expect("remove");
    let ledger = Ledger::open(cfg(fresh.path()), k.clone()).expect("reopen");
    write_n(&ledger, 2).await;
    ledger.shutdown().await;
    assert_eq!(verify_dir(fresh.path(), &k).expect("verify").head_seq, 2);
}

/// A key file cut short (a copy that stopped halfway, a full disk outside consentry) said
/// "invalid key material: key document is not valid JSON", naming no file.
#[test]
fn a_key_file_cut_short_is_named() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let path = tmp.path().join("ledger-keys.json");
    Keyring::load_or_create(&path).expect("create keys");
    let text = std::fs::read(&path).expect("read");
    std::fs::write(&path, &text[..text.len() / 2]).expect("cut");
    let errors = [
        Keyring::load(&path).expect_err("load"),
        Keyring::load_or_create(&path).expect_err("load_or_create"),
        Keyring::rotate(&path).expect_err("rotate"),
    ];
    for err in errors {
        let msg = err.to_string();
        assert!(msg.contains(&path.display().to_string()), "{msg}");
        assert!(msg.contains("cut short"), "{msg}");
    }
    assert_eq!(
        std::fs::read(&path).expect("read").len(),
        text.len() / 2,
        "left as it was"
    );
}

/// With its key file gone, a start made new keys, could decrypt nothing and cut the whole
/// segment as a "torn tail".
#[tokio::test]
async fn a_missing_key_file_refuses_to_open_and_cuts_nothing() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("ledger");
    let key_path = tmp.path().join("ledger-keys.json");
    let k = Keyring::load_or_create(&key_path).expect("create keys");
    write_and_close(cfg(&dir), &k, 10).await;
    std::fs::remove_file(&key_path).expect("remove keys");
    for also_checkpoints in [false, true] {
        if also_checkpoints {
            std::fs::remove_file(dir.join(CHECKPOINT_FILE)).expect("remove checkpoints");
        }
        let before = snapshot(&dir);
        let fresh = Keyring::load_or_create(&key_path).expect("a start makes new keys");
        let err = Ledger::open(cfg(&dir), fresh).expect_err("must refuse");
        let msg = err.to_string();
        assert!(matches!(err, LedgerError::WrongKeys(_)), "{err:?}");
        assert!(msg.contains(&key_path.display().to_string()), "{msg}");
        assert!(msg.contains("missing"), "{msg}");
        assert_eq!(snapshot(&dir), before, "nothing cut or quarantined");
        assert!(
            !key_path.exists(),
            "the keys made for nothing are not left behind"
        );
    }
}

/// A whole record that fails authentication is damage, not a torn write: it is not cut, nor
/// anything after it.
#[tokio::test]
async fn a_record_that_does_not_authenticate_is_not_taken_for_a_torn_tail() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let k = keys();
    write_and_close(cfg(tmp.path()), &k, 10).await;
    // Records 1..10 after the last checkpoint left (seq 0), as a crash leaves them.
    drop_last_checkpoint(tmp.path());
    let seg = only_segment(tmp.path());
    let original = std::fs::read(&seg).expect("read");
    for (i, want) in [(9usize, None), (0, Some(()))] {
        let (_, e, seq) = frames(&seg)[i];
        let mut data = original.clone();
        data[e - 1] ^= 1; // in the AEAD tag
        std::fs::write(&seg, &data).expect("write");
        let before = snapshot(tmp.path());
        let err = Ledger::open(cfg(tmp.path()), k.clone()).expect_err("must refuse");
        match want {
            // After records that authenticate: altered.
            None => assert_eq!(tamper(err), (seq, TamperKind::Modified)),
            // The very first one read: more likely the wrong keys, and said so.
            Some(()) => {
                assert!(matches!(&err, LedgerError::WrongKeys(m) if m.contains("key file")))
            }
        }
        assert_eq!(snapshot(tmp.path()), before, "nothing cut or quarantined");
    }
}

/// `verify` called a complete garbage line in the checkpoint file malformed; opening ignored it.
/// A torn last line (no newline: a crash mid-append) is still cut.
#[tokio::test]
async fn a_malformed_checkpoint_line_refuses_to_open_and_a_torn_one_is_cut() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let k = keys();
    write_and_close(cfg(tmp.path()), &k, 5).await;
    let cp = tmp.path().join(CHECKPOINT_FILE);
    let good = std::fs::read_to_string(&cp).expect("read");

    std::fs::write(&cp, format!("{good}{{not json\n")).expect("write");
    let before = snapshot(tmp.path());
    let err = Ledger::open(cfg(tmp.path()), k.clone()).expect_err("must refuse");
    assert!(err.to_string().contains("line 3 of"), "{err}");
    assert_eq!(tamper(err), (0, TamperKind::CheckpointInvalid));
    assert_eq!(snapshot(tmp.path()), before);

    std::fs::write(&cp, format!("{good}{{\"seq\":9")).expect("write");
    Ledger::open(cfg(tmp.path()), k.clone())
        .expect("a torn last line is cut")
        .shutdown()
        .await;
    assert_eq!(std::fs::read_to_string(&cp).expect("read"), good);
    verify_dir(tmp.path(), &k).expect("verify");
}

/// A full disk at the first start left an empty key file that every later start refused.
#[test]
fn a_full_disk_leaves_no_ledger_key_file() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let path = tmp.path().join("ledger-keys.json");
    crate::secrets::DISK_ROOM.with(|r| r.set(Some(10)));
    let err = Keyring::load_or_create(&path).expect_err("disk full");
    assert!(err.to_string().contains("No space left"), "{err}");
    assert_eq!(std::fs::read_dir(tmp.path()).expect("list").count(), 0);
    let k = Keyring::load_or_create(&path).expect("room again");
    let again = Keyring::load_or_create(&path).expect("reload");
    assert_eq!(k.verifying_key(), again.verifying_key());

    // Rotation replaces the file whole, or leaves it as it was.
    crate::secrets::DISK_ROOM.with(|r| r.set(Some(10)));
    Keyring::rotate(&path).expect_err("disk full");
    assert_eq!(std::fs::read_dir(tmp.path()).expect("list").count(), 1);
    assert_eq!(
        Keyring::load(&path).expect("intact").active_key_id(),
        KeyId(1)
    );
}

/// Printed with its chain (as anyhow's `{:#}` does), an I/O error named the OS error twice.
#[test]
fn an_io_error_names_the_os_error_once() {
    let e = LedgerError::io("open ledger lock", std::io::Error::from_raw_os_error(30));
    let shown = format!("{:#}", anyhow::Error::from(e));
    assert_eq!(shown.matches("os error 30").count(), 1, "{shown}");
}

/// A ledger directory reached through a symlink was "made owner-only" at every start: the
/// symlink's own mode (always 0777) was read instead of its target's.
#[cfg(unix)]
#[test]
fn a_symlinked_ledger_is_tightened_once() {
    use std::os::unix::fs::PermissionsExt;
    let tmp = tempfile::tempdir().expect("tempdir");
    let real = tmp.path().join("real");
    std::fs::create_dir(&real).expect("mkdir");
    std::fs::set_permissions(&real, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let link = tmp.path().join("ledger");
    std::os::unix::fs::symlink(&real, &link).expect("symlink");
    assert_eq!(make_owner_only(&link).expect("tighten"), 1);
    let mode = std::fs::metadata(&real).expect("stat").permissions().mode();
    assert_eq!(mode & 0o777, 0o700);
    assert!(std::fs::symlink_metadata(&link)
        .expect("lstat")
        .file_type()
        .is_symlink());
    assert_eq!(
        make_owner_only(&link).expect("again"),
        0,
        "nothing left to tighten"
    );
}

/// Where the directory cannot be written, an operator command takes a shared lock on a LOCK file
/// opened read-only, which a live writer's exclusive lock still refuses, or goes on without one
/// when there is no LOCK file.
#[test]
fn a_directory_that_cannot_be_written_is_locked_shared_for_reading() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let ro = std::io::Error::from(std::io::ErrorKind::ReadOnlyFilesystem);
    assert!(lock_for_reading(tmp.path(), &ro)
        .expect("no LOCK")
        .is_none());
    let writer = lock_exclusive(tmp.path()).expect("exclusive");
    assert!(matches!(
        lock_for_reading(tmp.path(), &ro),
        Err(LedgerError::Locked(_))
    ));
    drop(writer);
    let shared = lock_for_reading(tmp.path(), &ro).expect("shared");
    assert!(shared.is_some());
    assert!(lock_for_reading(tmp.path(), &ro)
        .expect("shared twice")
        .is_some());
    assert!(matches!(
        lock_exclusive(tmp.path()),
        Err(LedgerError::Locked(_))
    ));
}

/// Found by an outside review: once the clock had been ahead, records written at the right time
/// carried the ledger's later time in their headers, and a range by the time the history shows
/// (today) found none of them. A count of refused deliveries is found by any range its hour
/// overlaps.
#[tokio::test]
async fn ranges_go_by_the_time_the_history_shows() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let k = keys();
    let ledger = Ledger::open(cfg(tmp.path()), k.clone()).expect("open");
    let now = Utc::now();
    write_at(&ledger, [now + TimeDelta::days(30)]).await;
    write_at(&ledger, [now; 3]).await;
    let today = ReadFilter {
        from: Some(now - TimeDelta::hours(1)),
        to: Some(now + TimeDelta::hours(1)),
        ..Default::default()
    };
    let found = ledger.read_user(ALICE, &today).expect("read");
    assert_eq!(found.len(), 3, "{found:?}");
    let ahead = ReadFilter {
        from: Some(now + TimeDelta::days(29)),
        ..Default::default()
    };
    assert_eq!(ledger.read_user(ALICE, &ahead).expect("read").len(), 1);

    ledger.record_blocked(ALICE, "fitcoach", "heart_rate", "no-consent");
    ledger.shutdown().await;
    let ledger = Ledger::open(cfg(tmp.path()), k.clone()).expect("reopen");
    let blocked = |from: chrono::DateTime<Utc>| {
        let f = ReadFilter {
            from: Some(from),
            to: Some(from + TimeDelta::minutes(5)),
            ..Default::default()
        };
        ledger
            .read_user(ALICE, &f)
            .expect("read")
            .iter()
            .filter(|(_, e)| matches!(e, Entry::Blocked(_)))
            .count()
    };
    let hour = ledger
        .read_user(ALICE, &ReadFilter::default())
        .expect("read")
        .iter()
        .find_map(|(_, e)| match e {
            Entry::Blocked(b) => Some(b.hour_start),
            _ => None,
        })
        .expect("the count was flushed at shutdown");
    assert_eq!(blocked(hour + TimeDelta::minutes(50)), 1, "inside its hour");
    assert_eq!(blocked(hour + TimeDelta::minutes(60)), 0, "after its hour");
    assert_eq!(blocked(hour - TimeDelta::minutes(5)), 0, "before its hour");
    ledger.shutdown().await;
}

/// Found by an outside review: with the clock stepped 2 200 days forward while running, the next
/// purge (within a minute) deleted records minutes old, for good. Retention now goes no faster
/// than the time that has passed since the ledger opened.
#[tokio::test]
async fn a_clock_stepped_forward_while_running_deletes_nothing_early() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let k = keys();
    let ledger = Ledger::open(small_with_retention(tmp.path()), k.clone()).expect("open");
    write_n(&ledger, 12).await;
    let before = list_segments(tmp.path()).expect("list").len();
    assert!(before >= 2, "closed segments to purge");
    let ahead = TimeDelta::days(2200);
    ledger.shared().clock_skew_us.store(
        ahead.num_microseconds().expect("µs"),
        std::sync::atomic::Ordering::Relaxed,
    );
    // New records close segments, and each closing purges (after the records are durable).
    write_n(&ledger, 12).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let jumped = ledger
            .shared()
            .clock_jumped_us
            .load(std::sync::atomic::Ordering::Relaxed);
        if jumped > (ahead - TimeDelta::hours(1)).num_microseconds().unwrap() {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no purge saw the clock: {jumped}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    ledger.shutdown().await;
    assert!(
        segment_path(tmp.path(), 1).exists(),
        "records minutes old were purged: {:?}",
        list_segments(tmp.path())
    );
    verify_dir(tmp.path(), &k).expect("verify");
}
