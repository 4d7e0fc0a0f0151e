"""The module-parameter matrix of a lab (``--param MOD.PARAM=V1,V2``).

``python -m pykvm.lab nested --param kvm_amd.npt=0,1 --param kvm_amd.nested=1 TESTS`` runs TESTS
once per combination of the given values (their cartesian product, the first ``--param`` varying
slowest), all in one boot: between combinations the lab's KVM module stack is unloaded (``rmmod``,
last loaded first) and loaded again (``insmod``, in dependency order) with the combination's
parameters merged over the lab's defaults (``kvm_amd nested=1``).

This module is used on both sides and needs the standard library only:

* the host (:mod:`pykvm.lab.build`) parses and expands the ``--param`` options
  (:func:`parse_params`, :func:`expand`), writes the boot's ``/lab/matrix[-<boot>].json``
  (:func:`config`) and prints a table per combination from the results (:func:`combo_table`);
* inside the lab, ``/lab/run_pytest.py`` hands a boot that has such a file to :func:`guest_main`,
  which checks that every named parameter exists (``/sys/module/<mod>/parameters/<param>`` once
  the stack is loaded; one clear error otherwise), runs pytest once per combination and merges
  the JUnit files into one in which each testsuite and testcase name ends in ``[<combination>]``
  (``test_x[kvm_amd.npt=0]``) and carries the properties ``lab_combination``,
  ``lab_module_params`` (the parameters given to insmod) and ``lab_module_values`` (what
  /sys/module reads back after the load).

A combination's id names the parameters that take more than one value (``kvm_amd.npt=0``, several
joined by ``,``); when none does, all of them. Without ``--param`` none of this runs and result
names are what they always were.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from dataclasses import dataclass

# MOD.PARAM=V1[,V2...]: module names as /sys/module spells them ('-' is read as '_')
_PARAM = re.compile(r"^([A-Za-z0-9_-]+)\.([A-Za-z0-9_]+)=(.*)$")
_VALUE = re.compile(r"^[^\s,\"'\\]+$")
PROP_COMBO, PROP_PARAMS, PROP_VALUES = "lab_combination", "lab_module_params", "lab_module_values"

# inside the lab: the marker /init uses for a failure before the tests (pykvm/lab/initramfs.py)
INIT_ERROR = "@@PYKVM-LAB:{nonce}:INIT-ERROR={reason}@@"


@dataclass(frozen=True)
class ParamSpec:
    """One ``--param``: ``module.param`` and the values to try, in the given order."""

    module: str
    param: str
    values: tuple[str, ...]

    @property
    def key(self) -> str:
        return f"{self.module}.{self.param}"


@dataclass(frozen=True)
class Combo:
    """One combination: ``id`` (what result names end with) and ``params`` {module: {param: value}}
    (every ``--param``, one value each)."""

    id: str
    params: dict

    def to_json(self) -> dict:
        return {"id": self.id, "params": self.params}


def parse_param(text: str) -> ParamSpec:
    """``MOD.PARAM=V1,V2,...`` -> :class:`ParamSpec`. Raises ValueError (one line, naming the
    option) for anything else: no module, no ``=``, an empty or repeated value, a value with
    blanks or quotes."""
    m = _PARAM.match(text)
    if not m:
        raise ValueError(f"--param {text!r}: expected MODULE.PARAM=VALUE[,VALUE...] "
                         "(e.g. kvm_amd.npt=0,1)")
    mod, param, raw = m.group(1).replace("-", "_"), m.group(2), m.group(3)
    values = raw.split(",")
    for v in values:
        if not v:
            raise ValueError(f"--param {text}: empty value")
        if not _VALUE.match(v):
            raise ValueError(f"--param {text}: value {v!r} has a blank, quote or backslash")
    dup = next((v for i, v in enumerate(values) if v in values[:i]), None)
    if dup is not None:
        raise ValueError(f"--param {text}: value {dup} given twice")
    return ParamSpec(mod, param, tuple(values))


def parse_params(texts: list[str]) -> list[ParamSpec]:
    """Each of ``texts`` through :func:`parse_param`; ValueError also for a parameter given twice."""
    specs: list[ParamSpec] = []
    for t in texts:
        s = parse_param(t)
        if any(o.key == s.key for o in specs):
            raise ValueError(f"--param {s.key} given twice (list its values once: {s.key}=A,B)")
        specs.append(s)
    return specs


def expand(specs: list[ParamSpec]) -> list[Combo]:
    """The cartesian product of ``specs``' values, the first spec varying slowest; [] for no
    specs. Ids name the specs with several values (all specs when none has)."""
    if not specs:
        return []
    varying = [s for s in specs if len(s.values) > 1] or specs
    out = []
    for values in itertools.product(*(s.values for s in specs)):
        params: dict[str, dict[str, str]] = {}
        for s, v in zip(specs, values):
            params.setdefault(s.module, {})[s.param] = v
        cid = ",".join(f"{s.key}={v}" for s, v in zip(specs, values) if s in varying)
        out.append(Combo(cid, params))
    return out


def merged(defaults: dict, params: dict) -> dict[str, dict[str, str]]:
    """``params`` ({module: {param: value}}) over ``defaults`` (same shape); new dicts."""
    out = {m: dict(p) for m, p in defaults.items()}
    for m, p in params.items():
        out.setdefault(m, {}).update(p)
    return out


def describe(params: dict) -> str:
    """``{'kvm_amd': {'nested': '1', 'npt': '0'}}`` -> ``kvm_amd.nested=1 kvm_amd.npt=0``."""
    return " ".join(f"{m}.{k}={v}" for m in sorted(params) for k, v in params[m].items())


def check_modules(specs: list[ParamSpec], modules: list[str]) -> None:
    """ValueError (one line) for a ``--param`` whose module is not one of ``modules`` (the lab's
    KVM module stack, the only modules the lab reloads)."""
    for s in specs:
        if s.module not in modules:
            raise ValueError(f"--param {s.key}: no module {s.module} in the lab's KVM modules "
                             f"({', '.join(modules)})")


def config(stack: list[dict], defaults: dict, combos: list[Combo], reload: bool) -> dict:
    """The ``/lab/matrix[-<boot>].json`` of one boot: ``stack`` [{"module", "path"}] in load order
    (paths inside the lab), ``defaults`` {module: {param: value}}, the ``combos``, and whether
    the stack is reloaded between them (False where KVM is built into the kernel: one combination,
    set on the kernel command line)."""
    return {"stack": stack, "defaults": defaults, "combos": [c.to_json() for c in combos], "reload": reload}


# --------------------------------------------------------------------------------------------------
# JUnit: renaming and merging per combination


def _props(el: ET.Element) -> ET.Element:
    p = el.find("properties")
    if p is None:
        p = ET.Element("properties")
        el.insert(0, p)
    return p


def _add_prop(el: ET.Element, name: str, value: str) -> None:
    ET.SubElement(_props(el), "property", name=name, value=value)


def tag_suites(junit: bytes, combo_id: str, params: str, values: str) -> list[ET.Element]:
    """The testsuites of one combination's pytest ``junit``, each suite and testcase name ending
    in ``[combo_id]``, with the ``lab_combination`` property on both and ``lab_module_params``
    (``params``) and ``lab_module_values`` (``values``) on the suite. ValueError for XML that
    does not parse."""
    try:
        doc = ET.fromstring(junit)
    except ET.ParseError as e:
        raise ValueError(f"JUnit XML of {combo_id}: {e}") from None
    suites = [doc] if doc.tag == "testsuite" else list(doc.iter("testsuite"))
    for s in suites:
        s.set("name", f"{s.get('name', 'pytest')}[{combo_id}]")
        _add_prop(s, PROP_COMBO, combo_id)
        _add_prop(s, PROP_PARAMS, params)
        _add_prop(s, PROP_VALUES, values)
        for tc in s.iter("testcase"):
            tc.set("name", f"{tc.get('name')}[{combo_id}]")
            _add_prop(tc, PROP_COMBO, combo_id)
    return suites


def error_suite(combo_id: str, name: str, message: str, params: str = "", values: str = "") -> ET.Element:
    """A testsuite of one errored testcase ``name[combo_id]``: a combination whose modules did
    not load, or whose pytest wrote no JUnit XML."""
    s = ET.Element("testsuite", name=f"lab[{combo_id}]", tests="1", failures="0", errors="1", skipped="0")
    _add_prop(s, PROP_COMBO, combo_id)
    _add_prop(s, PROP_PARAMS, params)
    _add_prop(s, PROP_VALUES, values)
    tc = ET.SubElement(s, "testcase", classname="lab.modules", name=f"{name}[{combo_id}]", time="0")
    _add_prop(tc, PROP_COMBO, combo_id)
    ET.SubElement(tc, "error", message=message).text = message
    return s


def merge_suites(suites: list[ET.Element]) -> bytes:
    """One ``<testsuites>`` document (UTF-8, with declaration) holding ``suites``, with the totals."""
    root = ET.Element("testsuites", name="pytest")
    tot = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    for s in suites:
        for k in tot:
            tot[k] += int(s.get(k, 0) or 0)
        root.append(s)
    for k, v in tot.items():
        root.set(k, str(v))
    return ET.tostring(root, encoding="utf-8", xml_declaration=True)


def combined_status(statuses: list[int]) -> int:
    """The boot's pytest status from each combination's: 0 when all passed; the first that is
    neither 0 nor 5 (no tests) when there is one; 5 when no combination ran a test."""
    bad = [s for s in statuses if s not in (0, 5)]
    if bad:
        return bad[0]
    if statuses and all(s == 5 for s in statuses):
        return 5
    return 0


def _outcome(tc: ET.Element) -> str:
    if tc.find("failure") is not None or tc.find("error") is not None:
        return "failed"
    if tc.find("skipped") is not None:
        return "skipped"
    return "passed"


def _prop(el: ET.Element, name: str) -> str | None:
    p = el.find("properties")
    if p is None:
        return None
    return next((q.get("value") for q in p.findall("property") if q.get("name") == name), None)


def combo_table(junit: bytes | None) -> list[str]:
    """Lines of a table, one row per combination in ``junit`` (a boot's merged JUnit XML):
    passed / failed (errors included) / skipped counts, the module parameters /sys/module read
    back, and the failed tests' names. [] when ``junit`` has no combinations."""
    if not junit:
        return []
    try:
        root = ET.fromstring(junit)
    except ET.ParseError:
        return []
    rows: dict[str, dict] = {}
    for s in root.iter("testsuite"):
        cid = _prop(s, PROP_COMBO)
        if cid is None:
            continue
        row = rows.setdefault(cid, {"passed": 0, "failed": 0, "skipped": 0, "names": [], "values": ""})
        row["values"] = row["values"] or (_prop(s, PROP_VALUES) or "")
        for tc in s.iter("testcase"):
            out = _outcome(tc)
            row[out] += 1
            if out == "failed":
                row["names"].append(tc.get("name", "?"))
    if not rows:
        return []
    head = ("combination", "passed", "failed", "skipped", "module parameters read back", "failed tests")
    table = [head] + [(cid, str(r["passed"]), str(r["failed"]), str(r["skipped"]), r["values"] or "-",
                       ", ".join(r["names"]) or "-") for cid, r in rows.items()]
    widths = [max(len(row[i]) for row in table) for i in range(len(head) - 1)]
    lines = []
    for row in table:
        cells = [row[0].ljust(widths[0])] + [row[i].rjust(widths[i]) for i in (1, 2, 3)]
        cells.append(row[4].ljust(widths[4]))
        lines.append("  ".join(cells + [row[5]]).rstrip())
    return lines


# --------------------------------------------------------------------------------------------------
# inside the lab


def check_known(combos: list[dict], sysfs: str = "/sys/module") -> str:
    """'' when every parameter the ``combos`` name exists under ``sysfs`` (``<mod>/parameters/
    <param>``, the stack loaded), else a one-line reason: an unknown module or parameter."""
    for c in combos:
        for mod, ps in c["params"].items():
            mdir = os.path.join(sysfs, mod)
            if not os.path.isdir(mdir):
                return f"--param {mod}.{next(iter(ps))}: module {mod} is not loaded (no {mdir})"
            pdir = os.path.join(mdir, "parameters")
            for p in ps:
                if not os.path.exists(os.path.join(pdir, p)):
                    have = sorted(os.listdir(pdir)) if os.path.isdir(pdir) else []
                    return (f"--param {mod}.{p}: {mod} has no parameter {p} "
                            f"(its parameters: {', '.join(have) or 'none'})")
    return ""


def read_values(params: dict, sysfs: str = "/sys/module") -> str:
    """What ``sysfs`` reads back for each of ``params`` ({module: {param: value}}), as
    :func:`describe` writes them (``?`` for one that cannot be read)."""
    out: dict[str, dict[str, str]] = {}
    for mod, ps in params.items():
        for p in ps:
            try:
                with open(os.path.join(sysfs, mod, "parameters", p)) as f:
                    v = f.read().strip()
            except OSError:
                v = "?"
            out.setdefault(mod, {})[p] = v
    return describe(out)


def _run(argv: list[str]) -> str:
    """'' when ``argv`` succeeds, else its last line of output."""
    r = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if r.returncode == 0:
        return ""
    tail = (r.stdout or "").strip().splitlines()
    return f"{' '.join(argv)}: {tail[-1] if tail else f'exit status {r.returncode}'}"


def reload_stack(stack: list[dict], params: dict, sysfs: str = "/sys/module",
                 busybox: str = "busybox") -> str:
    """Unload ``stack`` (last first; a module not loaded is passed over) and load it again with
    ``params``; '' or the one-line reason it failed."""
    for e in reversed(stack):
        if os.path.isdir(os.path.join(sysfs, e["module"])):
            err = _run([busybox, "rmmod", e["module"]])
            if err:
                return err
    for e in stack:
        err = _run([busybox, "insmod", e["path"]] +
                   [f"{k}={v}" for k, v in params.get(e["module"], {}).items()])
        if err:
            return err
    return ""


def _junit_arg(args: list[str]) -> tuple[int, str]:
    for i, a in enumerate(args):
        if a.startswith("--junitxml="):
            return i, a.split("=", 1)[1]
    raise ValueError("the inner pytest arguments have no --junitxml=")


def _nonce(conf: str) -> str:
    try:
        with open(conf) as f:
            for line in f:
                if line.startswith("NONCE="):
                    return line.split("=", 1)[1].strip()
    except OSError:
        pass
    return ""


def guest_main(matrix_path: str, args_path: str, conf: str = "/lab/lab.conf",
               sysfs: str = "/sys/module") -> int:
    """Inside the lab: run the inner pytest (its arguments in ``args_path``) once per combination
    of ``matrix_path`` (see :func:`config`) and write the merged JUnit where ``--junitxml`` says.
    A parameter or module that does not exist is the /init error marker (one line, status 3)
    before any test runs. Returns the boot's pytest status (:func:`combined_status`).
    ``conf``: /init's lab.conf (the run's NONCE); ``sysfs``: where modules show."""
    with open(matrix_path) as f:
        cfg = json.load(f)
    with open(args_path) as f:
        args = json.load(f)
    nonce = _nonce(conf)
    where, junit_path = _junit_arg(args)
    reason = check_known(cfg["combos"], sysfs)
    if reason:
        print(INIT_ERROR.format(nonce=nonce, reason=reason), flush=True)
        return 3
    current: dict | None = merged(cfg["defaults"], {})   # what /init loaded
    suites: list[ET.Element] = []
    statuses = []
    n = len(cfg["combos"])
    for i, c in enumerate(cfg["combos"]):
        want = merged(cfg["defaults"], c["params"])
        params = describe(want)
        err = ""
        if cfg["reload"] and want != current:
            err = reload_stack(cfg["stack"], want, sysfs)
            current = None if err else want
        values = read_values(want, sysfs)
        print(f"[lab] parameter combination {i + 1}/{n}: {c['id']} (loaded: {values})", flush=True)
        if err:
            print(f"[lab] {c['id']}: modules did not load: {err}", flush=True)
            suites.append(error_suite(c["id"], "load_modules", err, params, values))
            statuses.append(1)
            continue
        xml = f"/tmp/junit-combo-{i}.xml"
        argv = list(args)
        argv[where] = f"--junitxml={xml}"
        rc = subprocess.call([sys.executable, "-m", "pytest", *argv])
        statuses.append(rc)
        try:
            with open(xml, "rb") as f:
                suites += tag_suites(f.read(), c["id"], params, values)
        except (OSError, ValueError) as e:
            suites.append(error_suite(c["id"], "pytest", f"inner pytest exit status {rc}, no JUnit XML: {e}",
                                      params, values))
            statuses[-1] = rc or 1
    with open(junit_path, "wb") as f:
        f.write(merge_suites(suites))
    return combined_status(statuses)
