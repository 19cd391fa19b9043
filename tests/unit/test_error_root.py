"""One error root: every error a user can cause derives from bpfwall.errors.Error, and `main`
reports it — and an OSError no layer expected — as one line, exit status 2, no traceback."""
from __future__ import annotations

import importlib
import inspect
import pkgutil

import pytest

import bpfwall
from bpfwall import cli
from bpfwall.errors import Error, UserError

# Exceptions that never reach the user: each is caught where it is raised and turned into one
# of the root's (or, for inotify, is an OSError, which main reports too).
INTERNAL = {
    "bpfwall.batch.BatchError",           # build_many then compiles the batch's units alone
    "bpfwall.nft.dump.Interrupted",       # the dump is tried again
    "bpfwall.nft.runner._Silent",
    "bpfwall.nft.state.Invalid",          # NftError naming the state file
    "bpfwall.scnpm.flow.Refused",         # an Untranslatable with its line: a problem line of the import
    "bpfwall.scnpm.flow.TooLarge",        # caught by Flow.direction: a Refused naming the chain
    "bpfwall.scnpm.translate.Untranslatable",  # a problem line of the import
    "bpfwall.watch.inotify.InotifyError",  # an OSError; the watcher raises WatchError
    "bpfwall.watch.log._Missing",         # caught by Log: a warning, then plain lines
    "bpfwall.watch.state.Malformed",      # the watcher's state is read as empty, with a warning
}


def _exception_classes():
    for info in pkgutil.walk_packages(bpfwall.__path__, "bpfwall."):
        if info.name.endswith("__main__"):
            continue
        module = importlib.import_module(info.name)
        for _, cls in inspect.getmembers(module, inspect.isclass):
            if issubclass(cls, BaseException) and cls.__module__ == info.name:
                yield f"{info.name}.{cls.__qualname__}", cls


def test_every_error_class_derives_from_the_root():
    classes = dict(_exception_classes())
    assert {"bpfwall.kernel.errors.KernelError", "bpfwall.lang.errors.LangError", "bpfwall.build.BuildError",
            "bpfwall.backends.bpf.BackendError", "bpfwall.unitkey.UnitNameError", "bpfwall.nft.errors.NftError",
            "bpfwall.policy.entry.PolicyError", "bpfwall.watch.state.WatchError", "bpfwall.run.RunError",
            "bpfwall.capacity.CapacityError", "bpfwall.runrecord.RecordError"} <= set(classes)
    outside = sorted(name for name, cls in classes.items() if not issubclass(cls, Error) and name not in INTERNAL)
    assert outside == []
    assert UserError is Error and not set(INTERNAL) - set(classes)  # the list names nothing that is gone


def one_line(capsys, *argv) -> str:
    assert cli.main(list(argv)) == 2
    err = capsys.readouterr().err
    assert err.startswith("bpfwall: error: ") and err.count("\n") == 1, err
    return err


def test_usage_errors_name_bpfwall_once(capsys):
    # It said "bpfwall: error: bpfwall: unrecognized arguments" (issue 12).
    assert one_line(capsys, "policy", "match", "x.service", "--bogus") == \
        "bpfwall: error: unrecognized arguments: --bogus (see --help)\n"
    assert one_line(capsys, "stats") == \
        "bpfwall: error: bpfwall stats: the following arguments are required: unit (see --help)\n"


def test_an_unreadable_packets_file_is_one_line(capsys, tmp_path):
    assert "--packets /proc/self/mem: Input/output error" in one_line(capsys, "test", "udp", "--packets",
                                                                      "/proc/self/mem")
    binary = tmp_path / "p.bin"
    binary.write_bytes(b"\xd0\xff\x00")
    assert "not a text file" in one_line(capsys, "test", "udp", "--packets", str(binary))


def test_a_drop_in_that_cannot_be_written_is_one_line(capsys, tmp_path):
    (tmp_path / "file").write_text("")
    err = one_line(capsys, "dropin", "a.service", "--directions", "ingress", "--no-reload", "--force",
                   "--unit-dir", str(tmp_path / "file"))
    assert f"cannot write {tmp_path}/file/a.service.d/bpfwall.conf" in err


def test_an_os_error_no_layer_expected_is_one_line(capsys, monkeypatch):
    """The last line of defence: main reports any OSError as 'PATH: reason'."""
    from bpfwall.commands import policy

    def broken(args):
        raise PermissionError(13, "Permission denied", "/etc/bpfwall/x.toml")
    monkeypatch.setattr(policy, "cmd_show", broken)
    assert "bpfwall: error: /etc/bpfwall/x.toml: Permission denied" in one_line(capsys, "policy", "show")


@pytest.mark.parametrize("error", [MemoryError(), Error("")])
def test_memory_and_empty_messages_are_one_line(capsys, monkeypatch, error):
    from bpfwall.commands import policy

    def broken(args):
        raise error
    monkeypatch.setattr(policy, "cmd_show", broken)
    one_line(capsys, "policy", "show")
