"""The ``mfd`` command: one entry point, subcommands, QEMU's option names.

Errors are one line on stderr: exit 2 for usage errors, 1 for everything else, 130 on Ctrl-C.
Set MFD_DEBUG=1 to see a traceback instead.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import uuid
from collections.abc import Iterator

import orjson

from mfd import __version__, api
from mfd.errors import Cancelled, MfdError, UsageError
from mfd.options import (
    IncomingOptions,
    MigrateOptions,
    MigrationParameters,
    RestoreOptions,
    SaveOptions,
)
from mfd.progress import LiveView, shown
from mfd.shm import control
from mfd.shm.guest import GuestConfig, run_guest
from mfd.shm.ramblock import RAMBlock
from mfd.shm.workload import PATTERNS, WorkloadState
from mfd.sysutil import Terminated, end_like_ctrl_c
from mfd.units import human, parse_size
from mfd.workers.tcp import parse_uri
from mfd.workers.tls import TLSOptions
from mfd.workers.tls import check as tls_check
from mfd.xhooks import FAULTS, XHooks


def parse_named(text: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or not name or not value:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
    return name, value


def named_size(text: str) -> tuple[str, int]:
    name, value = parse_named(text)
    return name, parse_size(value)


def json_object(text: str) -> dict:
    try:
        value = orjson.loads(text)
    except orjson.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not JSON: {e}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("expected a JSON object")
    return value


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2
        raise UsageError(f"{self.prog}: {message}")


def _channels(p: argparse.ArgumentParser) -> None:
    p.add_argument("--multifd-channels", type=int, default=2, metavar="N",
                   help="parallel channels (default 2, as QEMU)")


def _uuid(p: argparse.ArgumentParser) -> None:
    p.add_argument("--uuid", type=parse_uuid, default=bytes(16), metavar="UUID",
                   help="QEMU's -uuid, carried by every multifd channel (default: none, "
                   "zeros, as QEMU)")


def parse_uuid(text: str) -> bytes:
    try:
        return uuid.UUID(text).bytes
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a UUID: {text!r}") from None


def _fault(text: str) -> tuple[str, int]:
    """Test-only --x-fault KIND@OFFSET: the page at OFFSET of the first block."""
    kind, _, offset = text.partition("@")
    try:
        page, rest = divmod(int(offset, 0), 4096)
    except ValueError:
        rest = 1
    if kind not in FAULTS or rest:
        raise argparse.ArgumentTypeError(f"not {'|'.join(FAULTS)}@PAGE_OFFSET: {text!r}")
    return kind, page


def _file_args(p: argparse.ArgumentParser, image_help: str, guest_help: str) -> None:
    """What save and restore share: the file, where the RAM comes from or goes, offset."""
    p.add_argument("file")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--image", type=parse_named, action="append", metavar="NAME=PATH",
                       help=image_help)
    where.add_argument("--guest", help=guest_help)
    p.add_argument("--offset", type=parse_size, default=0,
                   help="start of the stream in FILE (bytes before it are kept)")
    _channels(p)
    p.add_argument("--direct-io", action="store_true", help="O_DIRECT channel I/O")
    p.add_argument("--json", action="store_true")


def _precopy_args(p: argparse.ArgumentParser) -> None:
    """What a live save and a live migration share: QEMU's precopy parameters."""
    p.add_argument("--zero-page-detection", choices=("multifd", "legacy", "none"),
                   default="multifd")
    p.add_argument("--downtime-limit", type=int, default=300, metavar="MS")
    p.add_argument("--max-bandwidth", type=parse_size, default=0,
                   help="bytes per second (0 = unlimited, mfd's default)")
    p.add_argument("--auto-converge", action="store_true")
    p.add_argument("--cpu-throttle-initial", type=int, default=20)
    p.add_argument("--cpu-throttle-increment", type=int, default=10)
    p.add_argument("--cpu-throttle-tailslow", action="store_true")
    p.add_argument("--max-cpu-throttle", type=int, default=99)
    p.add_argument("--throttle-trigger-threshold", type=int, default=50)
    p.add_argument("--x-clear-bitmap-shift", type=int, default=18, metavar="SHIFT",
                   help="KVM guests with manual dirty log protect: clear the log in chunks "
                   "of 2^SHIFT pages, each just before it is sent (QEMU's default 18)")


def _postcopy_args(p: argparse.ArgumentParser) -> None:
    """QEMU's capabilities, set on both ends (the source also with --no-multifd, as QEMU)."""
    p.add_argument("--postcopy-ram", action="store_true",
                   help="QEMU's capability: the switch may go postcopy (the guest runs at the "
                   "destination before its RAM has arrived, missing pages fetched)")
    p.add_argument("--postcopy-preempt", action="store_true",
                   help="QEMU's capability: requested pages travel on a connection of their "
                   "own, ahead of the push")


def _tls_args(p: argparse.ArgumentParser, server: bool) -> None:
    """QEMU's tls-creds (here the directory a tls-creds-x509 object names), and per end
    tls-hostname or verify-peer and tls-authz."""
    p.add_argument("--tls-creds", metavar="DIR", help="TLS 1.3 on every connection, with "
                   "QEMU's x509 files in DIR (ca-cert.pem, server-cert.pem, server-key.pem, "
                   "client-cert.pem, client-key.pem; 'mfd tls-certs' makes them)")
    if server:
        p.add_argument("--tls-verify-peer", action=argparse.BooleanOptionalAction,
                       default=True, help="ask for the source's client certificate (QEMU's "
                       "verify-peer, on by default)")
        p.add_argument("--tls-authz", action="append", default=[], metavar="DN",
                       help="accept only a source whose certificate has this distinguished "
                       "name, as QEMU (GnuTLS) prints it: 'O=mfd,CN=mfd-client' "
                       "(repeatable; QEMU's tls-authz)")
    else:
        p.add_argument("--tls-hostname", metavar="NAME", help="the name the destination's "
                       "certificate must carry (default: the host in the URI)")


def _tls(args: argparse.Namespace, server: bool) -> TLSOptions | None:
    others = ("--tls-authz" if server and args.tls_authz else
              "--no-tls-verify-peer" if server and not args.tls_verify_peer else
              "--tls-hostname" if not server and args.tls_hostname else None)
    if args.tls_creds is None:
        if others:
            raise UsageError(f"{others} goes with --tls-creds")
        return None
    opts = TLSOptions(args.tls_creds, verify_peer=args.tls_verify_peer,
                      authz=tuple(args.tls_authz)) if server else \
        TLSOptions(args.tls_creds, hostname=args.tls_hostname)
    tls_check(opts, server)
    return opts


def _params(args: argparse.Namespace) -> MigrationParameters:
    return MigrationParameters(
        multifd_channels=args.multifd_channels,
        multifd_compression=getattr(args, "multifd_compression", "none"),
        multifd_zstd_level=getattr(args, "multifd_zstd_level", 1),
        multifd_zlib_level=getattr(args, "multifd_zlib_level", 1),
        zero_page_detection=args.zero_page_detection,
        direct_io=getattr(args, "direct_io", False),
        downtime_limit=args.downtime_limit,
        max_bandwidth=args.max_bandwidth,
        max_postcopy_bandwidth=getattr(args, "max_postcopy_bandwidth", 0),
        auto_converge=args.auto_converge,
        cpu_throttle_initial=args.cpu_throttle_initial,
        cpu_throttle_increment=args.cpu_throttle_increment,
        cpu_throttle_tailslow=args.cpu_throttle_tailslow,
        max_cpu_throttle=args.max_cpu_throttle,
        throttle_trigger_threshold=args.throttle_trigger_threshold,
        x_clear_bitmap_shift=args.x_clear_bitmap_shift,
        xbzrle_cache_size=getattr(args, "xbzrle_cache_size", 64 << 20),
    )


def build_parser() -> argparse.ArgumentParser:
    top = _Parser(prog="mfd", description="QEMU multifd RAM migration and mapped-ram "
                  "save/restore, as a multiprocess pipeline.")
    top.add_argument("--version", action="version", version=f"mfd {__version__}")
    sub = top.add_subparsers(dest="command", required=True, parser_class=_Parser)
    _guest_command(sub)
    _save_command(sub)
    _restore_command(sub)
    _migrate_command(sub)
    _incoming_command(sub)
    _tls_certs_command(sub)
    _demo_command(sub)
    _bench_command(sub)
    _qmp_command(sub)
    _inspect_command(sub)
    return top


def _guest_command(sub: argparse._SubParsersAction) -> None:
    g = sub.add_parser("guest", help="start or control the built-in guest")
    g.add_argument("--name", required=True)
    g.add_argument("--ram", type=parse_size, help="size of the RAM block 'mem' (e.g. 1G)")
    g.add_argument("--block", type=named_size, action="append", default=[],
                   metavar="NAME=SIZE", help="another RAM block")
    g.add_argument("--dirty-rate", type=parse_size, default=0,
                   help="bytes the guest dirties per second of run time (0 = idle)")
    g.add_argument("--pattern", choices=PATTERNS, default="random")
    g.add_argument("--seed", type=int, default=1)
    g.add_argument("--zero-fraction", type=float, default=0.0,
                   help="share of writes that zero a whole page, as freed memory (0..1)")
    g.add_argument("--kvm", action="store_true",
                   help="a KVM VM runs the guest: one vCPU, KVM's dirty log")
    # test-only (XHooks): a KVM guest without manual dirty log protect; a stop that waits for
    # the vCPU's next exit instead of kicking it out
    g.add_argument("--x-no-manual-protect", action="store_true", help=argparse.SUPPRESS)
    g.add_argument("--x-no-kick", action="store_true", help=argparse.SUPPRESS)
    # plumbing, not a hook: a saved workload state to go on from (mfd restore passes the
    # file's)
    g.add_argument("--x-resume", type=json_object, help=argparse.SUPPRESS)
    g.add_argument("--stopped", action="store_true", help="start paused (like QEMU's -S)")
    g.add_argument("--attach", type=parse_named, action="append", default=[],
                   help=argparse.SUPPRESS)  # an incoming migration's unnamed RAM: NAME=PATH
    g.add_argument("--daemonize", action="store_true",
                   help="run in the background; return once the guest answers")
    act = g.add_mutually_exclusive_group()
    for name in ("stop", "cont", "quit", "query"):
        act.add_argument(f"--{name}", dest="action", action="store_const", const=name)
    act.add_argument("--throttle", type=int, metavar="PCT", help="set cpu throttle percentage")


def _save_command(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser("save", help="save guest RAM to a mapped-ram file, in parallel")
    _file_args(s, "a raw RAM image saved as the RAMBlock NAME", "a running guest (live save)")
    s.add_argument("--stop-first", action="store_true",
                   help="pause the guest before saving, as virsh save does")
    s.add_argument("--machine", default="none", help="machine type in the file (default none)")
    _precopy_args(s)


def _restore_command(sub: argparse._SubParsersAction) -> None:
    r = sub.add_parser("restore", help="restore a migration file (mfd's or QEMU's)")
    _file_args(r, "write RAMBlock NAME to the raw image PATH",
               "start a new, stopped guest with the restored RAM")
    r.add_argument("--lazy", action="store_true",
                   help="with --guest and a mapped-ram file: the guest runs at once, its "
                   "pages read as it touches them while the channels load the rest")


def _migrate_command(sub: argparse._SubParsersAction) -> None:
    m = sub.add_parser("migrate", help="live-migrate a guest over TCP to 'mfd incoming' or "
                       "to a QEMU started with -incoming")
    m.add_argument("uri", help="tcp:HOST:PORT (or tcp://HOST:PORT) of the destination")
    src = m.add_mutually_exclusive_group(required=True)
    src.add_argument("--guest", help="the running guest to migrate")
    src.add_argument("--image", type=parse_named, action="append", metavar="NAME=PATH",
                     help="a raw RAM image sent as the RAMBlock NAME (a stopped guest)")
    _channels(m)
    m.add_argument("--multifd-compression", choices=("none", "zstd", "zlib"), default="none")
    m.add_argument("--multifd-zstd-level", type=int, default=1)
    m.add_argument("--multifd-zlib-level", type=int, default=1)
    _precopy_args(m)
    m.add_argument("--multifd-flush-after-each-section", action="store_true",
                   help="legacy sync per section (QEMU machine types <= 8.0)")
    m.add_argument("--no-multifd", dest="multifd", action="store_false",
                   help="capability multifd off: every page on the main channel")
    m.add_argument("--xbzrle", action="store_true",
                   help="QEMU's capability: a page sent again goes as the bytes that "
                   "changed since it went (with --no-multifd, as QEMU)")
    m.add_argument("--xbzrle-cache-size", type=parse_size, default=64 << 20, metavar="SIZE",
                   help="the source's cache of pages sent (QEMU's parameter; a power of two, "
                   "default 64M)")
    _postcopy_args(m)
    m.add_argument("--max-postcopy-bandwidth", type=parse_size, default=0,
                   help="bytes per second of the push after the switch (0 = unlimited)")
    m.add_argument("--postcopy-after", type=float, metavar="SECONDS",
                   help="switch to postcopy after this much precopy (or QMP "
                   "migrate-start-postcopy at any time)")
    m.add_argument("--no-verify", dest="verify", action="store_false",
                   help="to an mfd destination: do not compare RAM at switchover (neither "
                   "end hashes pages; a shorter downtime, as with QEMU)")
    _uuid(m)
    m.add_argument("--timeout", type=float, metavar="SECONDS",
                   help="cancel when the migration would take longer")
    m.add_argument("--monitor", metavar="PATH", help="serve a QMP-style monitor at PATH")
    m.add_argument("--machine", default="none", help="machine type in the stream")
    m.add_argument("--keep-source", action="store_true", help="leave the source guest paused "
                   "after the migration, as QEMU does (postmigrate); by default it quits")
    _tls_args(m, server=False)
    m.add_argument("--json", action="store_true")


def _incoming_command(sub: argparse._SubParsersAction) -> None:
    n = sub.add_parser("incoming", help="wait for a migration from 'mfd migrate' or QEMU")
    n.add_argument("--listen", required=True, metavar="tcp:HOST:PORT",
                   help="the one port for the main channel and every multifd channel")
    n.add_argument("--multifd-channels", type=int, metavar="N",
                   help="channels a multifd source opens (default 2, as QEMU; an mfd "
                   "source says its own)")
    n.add_argument("--multifd-compression", choices=("none", "zstd", "zlib"),
                   help="the source's compression (default none; an mfd source says)")
    n.add_argument("--multifd-flush-after-each-section", action="store_true", default=None,
                   help="the source syncs after each section (QEMU machine types <= 8.0)")
    _uuid(n)
    dst = n.add_mutually_exclusive_group()
    dst.add_argument("--guest", help="name of the guest that will run here (default vm0)")
    dst.add_argument("--image", type=parse_named, action="append", metavar="NAME=PATH",
                     help="write RAMBlock NAME to the raw image PATH instead of a guest")
    n.add_argument("--prealloc", type=named_size, action="append", default=[],
                   metavar="NAME=SIZE", help="allocate and zero RAM block NAME (SIZE, e.g. "
                   "1G, as the source has it) before listening, as QEMU's prealloc=on; "
                   "repeatable")
    n.add_argument("--timeout", type=float, metavar="SECONDS",
                   help="give up when no migration completed within this")
    n.add_argument("--monitor", metavar="PATH", help="serve a QMP-style monitor at PATH")
    n.add_argument("--stopped", action="store_true", help="keep the guest paused after the "
                   "migration, as QEMU's -S ('mfd guest --cont' starts it)")
    _postcopy_args(n)
    _tls_args(n, server=True)
    n.add_argument("--json", action="store_true")
    # test-only: slow receive channels (seconds per packet, comma separated); no recv sync;
    # receive channels damage the page at this offset of the first block (KIND@OFFSET, KIND
    # one of xhooks.FAULTS) each time they place it: verification must catch it
    n.add_argument("--x-channel-delay", default="", help=argparse.SUPPRESS)
    n.add_argument("--x-skip-sync", action="store_true", help=argparse.SUPPRESS)
    n.add_argument("--x-fault", type=_fault, help=argparse.SUPPRESS)


def _tls_certs_command(sub: argparse._SubParsersAction) -> None:
    t = sub.add_parser("tls-certs", help="make a throwaway CA and the certificates QEMU's "
                       "tls-creds-x509 reads, for --tls-creds (demos and tests); a CA already "
                       "in DIR signs them")
    t.add_argument("dir", help="the directory to write (ca-cert.pem, server-cert.pem, ...)")
    t.add_argument("--host", action="append", required=True, metavar="NAME",
                   help="a DNS name or IP address the server certificate carries (repeatable; "
                   "the first is its CN)")
    t.add_argument("--client-cn", default="mfd-client",
                   help="the client certificate's CN (default mfd-client)")
    t.add_argument("--days", type=int, default=365, help="validity (default 365)")


def _demo_command(sub: argparse._SubParsersAction) -> None:
    d = sub.add_parser("demo", help="live migration of a writing 1 GiB guest (both ends on "
                       "this machine, or one end of the two-node demo)")
    role = d.add_mutually_exclusive_group()
    role.add_argument("--connect", metavar="tcp://HOST:PORT",
                      help="be node A: migrate the guest to the node B listening there")
    role.add_argument("--listen", metavar="tcp://HOST:PORT",
                      help="be node B: receive the guest there and run it")
    role.add_argument("--save", metavar="FILE", help="be node A of the file scenario: save "
                      "the running guest to FILE (mapped-ram, in parallel)")
    role.add_argument("--restore", metavar="FILE",
                      help="be node B of the file scenario: restore FILE and run the guest")
    d.add_argument("--name", default="vm0", help="the guest's name on a node (default vm0)")
    d.add_argument("--kvm", action=argparse.BooleanOptionalAction, default=None,
                   help="a KVM vCPU runs the guest (default: where /dev/kvm works)")
    d.add_argument("--ram", type=parse_size, default=1 << 30)
    d.add_argument("--dirty-rate", type=parse_size, default=100 << 20)
    _channels(d)
    d.set_defaults(multifd_channels=4)
    d.add_argument("--multifd-compression", choices=("none", "zstd", "zlib"), default="none")
    d.add_argument("--multifd-zstd-level", type=int, default=1)
    d.add_argument("--multifd-zlib-level", type=int, default=1)
    _precopy_args(d)
    d.add_argument("--postcopy", choices=("0", "1"), default="0",
                   help="1: the live migration switches to postcopy after 1 s of precopy "
                   "(on both nodes; docker compose: MFD_POSTCOPY=1)")
    d.add_argument("--tls", choices=("0", "1"), default="0",
                   help="1: every connection TLS 1.3, each end's certificate checked (on both "
                   "nodes; docker compose: MFD_TLS=1)")
    d.add_argument("--tls-creds", metavar="DIR", help="--tls 1: the x509 files (on one "
                   "machine, by default throwaway ones made by 'mfd tls-certs')")
    d.add_argument("--run-after", type=float, default=10.0, metavar="SECONDS",
                   help="on a node: how long its guest runs on, reported every 5 s, before "
                   "the node exits (default 10)")
    d.add_argument("--timeout", type=float, metavar="SECONDS",
                   help="--listen: give up when no migration completed within this")
    d.add_argument("--monitor", metavar="PATH",
                   help="--listen: serve a QMP-style monitor at PATH")
    d.add_argument("--json", action="store_true")


def _bench_command(sub: argparse._SubParsersAction) -> None:
    b = sub.add_parser("bench", help="measure save, restore, migrate and live migration "
                       "against QEMU and the physical limits")
    from mfd.bench.options import add_arguments

    add_arguments(b)


def _qmp_command(sub: argparse._SubParsersAction) -> None:
    q = sub.add_parser("qmp", help="run one command on a QMP monitor (mfd's or QEMU's) and "
                       "print its return value")
    q.add_argument("socket", help="the monitor's unix socket")
    q.add_argument("execute", metavar="COMMAND", help="e.g. query-migrate")
    q.add_argument("arguments", nargs="?", type=json_object, metavar="JSON",
                   help='its arguments, a JSON object, e.g. \'{"max-bandwidth": 104857600}\'')
    q.add_argument("--timeout", type=float, default=5.0, metavar="SECONDS")


def _inspect_command(sub: argparse._SubParsersAction) -> None:
    i = sub.add_parser("inspect", help="show the structure of a QEMU migration file")
    i.add_argument("file")
    i.add_argument("--offset", type=parse_size, default=0)
    i.add_argument("--json", action="store_true")


def cmd_guest(args: argparse.Namespace) -> int:
    if args.action or args.throttle is not None:
        with control.GuestClient(args.name) as g:
            if args.throttle is not None:
                out = g.set_throttle(args.throttle)
            elif args.action == "quit":
                g.quit()
                print(f"guest {args.name} quit")
                return 0
            else:
                out = getattr(g, args.action)()
        print(orjson.dumps(out, option=orjson.OPT_INDENT_2).decode())
        return 0
    attached = tuple(RAMBlock(idstr, os.stat(path).st_size, path) for idstr, path in args.attach)
    blocks = ([("mem", args.ram)] if args.ram else []) + list(args.block) + \
        [(b.idstr, b.used_length) for b in attached]
    if not blocks:
        raise UsageError("mfd guest: give --ram SIZE and/or --block NAME=SIZE")
    for name, size in blocks:
        if size <= 0 or size % 4096:
            raise UsageError(f"mfd guest: block {name!r} size {size} is not a positive "
                             "multiple of 4096")
    if args.daemonize:
        argv = [a for a in sys.argv[sys.argv.index("guest") + 1:] if a != "--daemonize"]
        control.start_guest_daemon(argv, args.name).close()
        print(f"guest {args.name} running in the background "
              f"(control socket {control.socket_path(args.name)})")
        return 0
    if args.kvm and args.zero_fraction:
        raise UsageError("mfd guest: --kvm takes no --zero-fraction")
    cfg = GuestConfig(args.name, tuple(blocks),
                      WorkloadState(args.dirty_rate, args.pattern, args.seed,
                                    zero_fraction=args.zero_fraction),
                      start_stopped=args.stopped, attached=attached, kvm=args.kvm,
                      resume=args.x_resume, x=XHooks(no_manual_protect=args.x_no_manual_protect,
                                                     no_kick=args.x_no_kick))

    def ready(ram) -> None:
        paths = ", ".join(f"{b.idstr}={b.path}" for b in ram.blocks)
        print(f"guest {args.name} {'paused' if args.stopped else 'running'}: {paths}",
              flush=True)

    run_guest(cfg, ready)
    return 0


def cmd_save(args: argparse.Namespace) -> int:
    images = dict(args.image) if args.image else None
    show = sys.stderr.isatty() and args.guest and not args.json
    with shown(LiveView(f"live save of {args.guest}") if show else None) as progress:
        res = api.save(args.file, images=images, guest=args.guest, params=_params(args),
                       options=SaveOptions(machine=args.machine, offset=args.offset,
                                           stop_first=args.stop_first),
                       progress=progress)
    if args.json:
        print(orjson.dumps(res.query_migrate | {"file": args.file,
                                                "digests": res.digests}).decode())
        return 0
    total = res.normal_pages * 4096
    secs = res.total_time_ms / 1000
    down = f", downtime {res.downtime_ms:.0f} ms" if args.guest else ""
    print(f"saved {args.file}: {res.normal_pages} pages written ({human(total)}), "
          f"{res.zero_pages} zero pages, {res.rounds} round(s), {secs:.3f} s{down}")
    return 0


def cmd_restore(args: argparse.Namespace) -> int:
    images = dict(args.image) if args.image else None
    res = api.restore(args.file, images=images, guest=args.guest,
                      options=RestoreOptions(multifd_channels=args.multifd_channels,
                                             offset=args.offset, direct_io=args.direct_io,
                                             lazy=args.lazy))
    if args.json:
        print(orjson.dumps(vars(res)).decode())
        return 0
    where = (f"guest {res.guest} (running after {res.running_after:.3f} s, {res.faults} "
             "page(s) it needed first)" if res.running_after is not None else
             f"guest {res.guest} (paused)") if res.guest else ", ".join(
        f"{k}={v}" for k, v in res.blocks.items())
    check = "digests verified" if res.verified else "no mfd trailer: nothing to verify"
    print(f"restored {args.file} -> {where}: {human(res.bytes_read)} read in "
          f"{res.seconds:.3f} s, {check}")
    return 0


@contextlib.contextmanager
def _outcome(what: str) -> Iterator[None]:
    """A migration's error line says whether it failed or was cancelled, then why."""
    try:
        yield
    except UsageError:
        raise
    except Cancelled as e:
        raise MfdError(f"{what} cancelled: {e}") from None
    except MfdError as e:
        raise MfdError(f"{what} failed: {e}") from None


def cmd_migrate(args: argparse.Namespace) -> int:
    opts = MigrateOptions(machine=args.machine, multifd=args.multifd, uuid=args.uuid,
                          flush_after_each_section=args.multifd_flush_after_each_section,
                          timeout=args.timeout, keep_source=args.keep_source,
                          verify=args.verify, postcopy=args.postcopy_ram,
                          postcopy_after=args.postcopy_after,
                          postcopy_preempt=args.postcopy_preempt, tls=_tls(args, False),
                          xbzrle=args.xbzrle)
    view = None if args.json else LiveView(f"migrate to {args.uri}")
    with _outcome("migration"), shown(view) as progress:
        res = api.migrate(args.uri, images=dict(args.image) if args.image else None,
                          guest=args.guest, params=_params(args), options=opts,
                          progress=progress, monitor=args.monitor,
                          warn=lambda line: print(f"mfd migrate: {line}", file=sys.stderr))
    if args.json:
        print(orjson.dumps(res.query_migrate | {"digests": res.digests}).decode())
        return 0
    secs = res.total_time_ms / 1000
    print(f"migrated to {args.uri}: {res.rounds} round(s), {human(res.transferred)} "
          f"transferred, {res.normal_pages} pages sent, {res.zero_pages} zero, {secs:.3f} s, "
          f"downtime {res.downtime_ms:.0f} ms" + (
              f" (verifying RAM {res.query_migrate.get('x-verify-time', 0)} ms of it), RAM "
              "equal on both ends" if res.digests else ", the destination (QEMU) loaded it"))
    return 0


def cmd_tls_certs(args: argparse.Namespace) -> int:
    from mfd import tlscerts

    if args.days < 1:
        raise UsageError("--days must be at least 1")
    try:
        subjects = tlscerts.make(args.dir, args.host, args.client_cn, args.days)
    except OSError as e:
        raise MfdError(f"tls-certs: cannot write {args.dir}: {e.strerror}") from None
    print(f"wrote a CA, a server certificate for {', '.join(args.host)} and a client "
          f"certificate ({subjects['client-cert.pem']}) to {args.dir}")
    return 0


def cmd_incoming(args: argparse.Namespace) -> int:
    delays = tuple(float(x) for x in args.x_channel_delay.split(",") if x)
    opts = IncomingOptions(timeout=args.timeout,
                           multifd_channels=args.multifd_channels,
                           multifd_compression=args.multifd_compression,
                           flush_after_each_section=args.multifd_flush_after_each_section,
                           uuid=args.uuid,
                           x=XHooks(channel_delays=delays, skip_sync=args.x_skip_sync,
                                    fault=args.x_fault),
                           stopped=args.stopped, postcopy_ram=args.postcopy_ram,
                           postcopy_preempt=args.postcopy_preempt, tls=_tls(args, True),
                           prealloc=tuple(args.prealloc))
    with _outcome("incoming migration"):
        res = api.incoming(args.listen, images=dict(args.image) if args.image else None,
                           guest=args.guest, options=opts, monitor=args.monitor)
    if args.json:
        print(orjson.dumps(vars(res)).decode())
        return 0
    where = f"guest {res.guest} running" if res.guest else ", ".join(
        f"{k}={v}" for k, v in res.blocks.items())
    checked = "RAM verified equal to the source's" if res.verified else \
        "RAM not verified (the source is QEMU)" if res.source == "qemu" else \
        "RAM not verified (the source said --no-verify)"
    print(f"incoming migration completed: {where}, {checked} "
          f"({res.total_time_ms / 1000:.3f} s)")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from mfd.describe import as_text

    d = api.inspect(args.file, args.offset)
    print(orjson.dumps(d, option=orjson.OPT_INDENT_2).decode() if args.json else as_text(d))
    return 0


@contextlib.contextmanager
def _throwaway_creds(wanted: bool) -> Iterator[str | None]:
    """A temporary directory of x509 files for TLS on one machine (removed after)."""
    if not wanted:
        yield None
        return
    import shutil
    import tempfile

    from mfd import tlscerts

    d = tempfile.mkdtemp(prefix="mfd-tls-")
    try:
        tlscerts.make(d, ["127.0.0.1"])
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def cmd_demo(args: argparse.Namespace) -> int:
    from mfd import demo

    if (args.timeout is not None or args.monitor) and not args.listen:
        raise UsageError("mfd demo: --timeout and --monitor go with --listen")
    if args.run_after < 0:
        raise UsageError("mfd demo: --run-after must be >= 0")
    for uri in (args.connect, args.listen):
        if uri:
            parse_uri(uri)  # before a guest starts
    params = _params(args)
    postcopy = args.postcopy == "1"
    if postcopy and (args.save or args.restore):
        raise UsageError("mfd demo: --postcopy 1 is for the live migration")
    tls = args.tls == "1"
    if tls and (args.save or args.restore):
        raise UsageError("mfd demo: --tls 1 is for the live migration (files are not TLS)")
    if tls and (args.connect or args.listen) and not args.tls_creds:
        raise UsageError("mfd demo: a node's --tls 1 needs --tls-creds DIR (the same CA on "
                         "both nodes)")
    creds = args.tls_creds if tls else None
    if creds is not None:
        tls_check(TLSOptions(creds), server=bool(args.listen))

    def say(line: str) -> None:
        if not args.json:
            print(line, flush=True)

    # the view lasts as long as the migration (demo: shown()), the summary said after it
    view = None if args.json or args.listen or args.restore else LiveView(
        f"live {'save' if args.save else 'migration'}")
    use_kvm = False if args.listen or args.restore else demo.kvm_default(args.kvm, say)
    if args.connect:
        out = demo.source(args.connect, args.name, args.ram, args.dirty_rate, params, say,
                          view, args.run_after, use_kvm, postcopy,
                          TLSOptions(creds) if creds else None)
    elif args.listen:
        out = demo.destination(args.listen, args.name, say, args.run_after, args.timeout,
                               args.monitor, postcopy, TLSOptions(creds) if creds else None)
    elif args.save:
        out = demo.save(args.save, args.name, args.ram, args.dirty_rate, params, say, view,
                        use_kvm)
    elif args.restore:
        out = demo.restore(args.restore, args.name, args.multifd_channels, say,
                           args.run_after)
    else:
        with _throwaway_creds(tls and creds is None) as made:
            out = demo.run(args.ram, args.dirty_rate, params, say, view, use_kvm, postcopy,
                           creds or made)
    if args.json:
        print(orjson.dumps(out).decode())
    return 0


def cmd_qmp(args: argparse.Namespace) -> int:
    """What ``socat`` does for QEMU users, one command at a time: a container's health check,
    a script's ``query-migrate``; a QMP error is one line and exit 1."""
    from mfd.qmp import QMPClient

    with QMPClient(args.socket, args.timeout) as qmp:
        value = qmp.execute(args.execute, args.arguments)  # an error reply: CommandError
    print(orjson.dumps(value, option=orjson.OPT_INDENT_2).decode())
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from mfd.bench.main import run

    return run(args)


COMMANDS = {"guest": cmd_guest, "save": cmd_save, "restore": cmd_restore,
            "inspect": cmd_inspect, "demo": cmd_demo, "migrate": cmd_migrate,
            "incoming": cmd_incoming, "bench": cmd_bench, "qmp": cmd_qmp,
            "tls-certs": cmd_tls_certs}


def main(argv: list[str] | None = None) -> int:
    debug = bool(os.environ.get("MFD_DEBUG"))
    end_like_ctrl_c()
    try:
        args = build_parser().parse_args(argv)
        return COMMANDS[args.command](args)
    except UsageError as e:
        print(f"mfd: {e}" if not str(e).startswith("mfd") else str(e), file=sys.stderr)
        return 2
    except MfdError as e:
        if debug:
            raise
        print(f"mfd: {e}", file=sys.stderr)
        return 1
    except Terminated as e:
        print(f"mfd: terminated ({e})", file=sys.stderr)
        return 128 + e.signum
    except KeyboardInterrupt:
        print("mfd: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 1
    except Exception as e:  # a bug: still one line, the traceback only on request
        if debug:
            raise
        print(f"mfd: internal error: {type(e).__name__}: {e} (MFD_DEBUG=1 for a traceback)",
              file=sys.stderr)
        return 1
