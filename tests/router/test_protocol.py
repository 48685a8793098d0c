import msgspec
import pytest

from router.protocol import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    CachedBlock,
    KvEventBatch,
    KvStateDump,
    LoadReport,
    PinHint,
    ProtocolError,
    ReplicaAlive,
    RouteDone,
    RouteFirstToken,
    RoutePicked,
    StateDumpRequest,
    Subjects,
    WorkerRegistration,
    decode,
    decode_replica_note,
    encode,
    registration_problem,
)

MESSAGES = [
    KvEventBatch(
        worker_id="w0",
        epoch=12,
        seq=3,
        ts=1.5,
        events=[
            BlockStored([2**64 - 1, 5], parent_hash=None, tier="device"),
            BlockStored([9], parent_hash=5, tier="host"),
            BlockRemoved([5], tier="device"),
            AllBlocksCleared(),
        ],
    ),
    KvStateDump("w0", 12, 3, [CachedBlock(1, None), CachedBlock(2, 1, "disk")]),
    StateDumpRequest("gw-1"),
    LoadReport("w0", 1.0, 2, 3, 400, 10, 100, 5000.0, 300.0),
    WorkerRegistration("w0", "http://127.0.0.1:9000", "tiny", 16, 1024, "torch", 12, 1.0),
    PinHint("s1", [1, 2, 3], 30.0),
]


@pytest.mark.parametrize("message", MESSAGES, ids=lambda m: type(m).__name__)
def test_round_trip(message: msgspec.Struct) -> None:
    assert decode(encode(message), type(message)) == message


@pytest.mark.parametrize(
    "data",
    [b"", b"\xc1", encode(LoadReport("w0", 1.0, 2, 3, 400, 10, 100, 5000.0, 300.0)), b"\x93\x01"],
)
def test_malformed_raises_protocol_error(data: bytes) -> None:
    with pytest.raises(ProtocolError):
        decode(data, KvEventBatch)


@pytest.mark.parametrize(
    "note",
    [
        RoutePicked("a", "r1", "w0", "m", 64, 1, 0, chain=b"12345678"),
        RouteFirstToken("a", "r1"),
        RouteDone("a", "r1", "stop", 3),
        ReplicaAlive("a"),
    ],
    ids=lambda m: type(m).__name__,
)
def test_replica_notes_round_trip_by_their_tag(note: msgspec.Struct) -> None:
    assert decode_replica_note(encode(note)) == note


@pytest.mark.parametrize(
    "data", [b"", b"\x01garbage", encode(ReplicaAlive("a"))[:-1], encode(PinHint("s", [1], 1.0))]
)
def test_a_malformed_replica_note_raises_protocol_error(data: bytes) -> None:
    with pytest.raises(ProtocolError, match="invalid replica note"):
        decode_replica_note(data)


@pytest.mark.parametrize("link_ms", [-1.0, float("nan"), float("inf")])
def test_a_load_report_with_an_impossible_link_time_is_rejected(link_ms: float) -> None:
    raw = msgspec.msgpack.encode(LoadReport("w0", 1.0, 2, 3, 400, 10, 100, 5000.0, 300.0, 8, link_ms))
    with pytest.raises(ProtocolError):
        decode(raw, LoadReport)


def test_a_load_report_from_an_older_worker_has_no_link_time() -> None:
    fields = ["worker_id", "ts", "running", "waiting", "active_prefill_tokens", "used_blocks"]
    fields += ["total_blocks", "prefill_tok_s", "decode_tok_s", "host_blocks"]
    values = ["w0", 1.0, 2, 3, 400, 10, 100, 5000.0, 300.0, 8]
    report = decode(msgspec.msgpack.encode(dict(zip(fields, values, strict=True))), LoadReport)
    assert (report.host_block_ms, report.disk_block_ms, report.onboard_async) == (0.0, 0.0, False)


def test_unknown_tier_is_rejected() -> None:
    raw = msgspec.msgpack.encode(
        {
            "worker_id": "w",
            "epoch": 1,
            "seq": 0,
            "ts": 0.0,
            "events": [{"type": "stored", "block_hashes": [1], "tier": "floppy"}],
        }
    )
    with pytest.raises(ProtocolError):
        decode(raw, KvEventBatch)


def test_subjects() -> None:
    subjects = Subjects("prod")
    assert subjects.kv("w-1") == "kvgate.prod.kv.w-1"
    assert subjects.load("w-1") == "kvgate.prod.load.w-1"
    assert subjects.pin("w-1") == "kvgate.prod.pin.w-1"
    assert subjects.kv_all == "kvgate.prod.kv.>"
    assert Subjects.worker_of(subjects.kv("w-1")) == "w-1"
    for bad in ["a.b", "*", ">", "", "a b"]:
        with pytest.raises(ProtocolError):
            subjects.kv(bad)


def _registration(**changes: object) -> WorkerRegistration:
    fields = dict(
        worker_id="w-0", url="http://10.0.0.1:8000", model="m", block_size=16, num_blocks=100,
        engine="mock", epoch=1, heartbeat_ts=1.0,
    )  # fmt: skip
    fields.update(changes)
    return WorkerRegistration(**fields)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("changes", "problem"),
    [
        ({"block_size": 0}, "block_size"),
        ({"block_size": 1 << 20}, "block_size"),
        ({"num_blocks": -1}, "num_blocks"),
        ({"max_num_seqs": 0}, "max_num_seqs"),
        ({"url": "file:///etc/passwd"}, "url"),
        ({"url": "http://user:pw@evil:1"}, "url"),
        ({"url": "http://" + "a" * 3000}, "url"),
        ({"model": ""}, "model"),
        ({"model": "m\x00"}, "model"),
        ({"tokenizer": "x" * 5000}, "tokenizer"),
        ({"worker_id": "a.b"}, "worker id"),
        ({"heartbeat_ts": float("nan")}, "heartbeat_ts"),
        ({"priority_threshold": 1 << 40}, "priority_threshold"),
        ({"host_blocks": -1}, "host_blocks"),
        ({"host_blocks": 1 << 41}, "host_blocks"),
    ],
)
def test_a_bad_registration_names_its_problem(changes: dict[str, object], problem: str) -> None:
    assert problem in (registration_problem(_registration(**changes)) or "")


def test_a_good_registration_passes_and_must_sit_under_its_own_key() -> None:
    assert registration_problem(_registration()) is None
    assert registration_problem(_registration(url="https://vllm-0.vllm:8000/")) is None
    assert "another worker" in (registration_problem(_registration(), key="w-1") or "")
