"""Stand-in shared libraries for the CUDA runtime libraries a CUDA torch wheel needs but this machine lacks.

Used by .ci/cuda_build_check.sh only. The CUDA torch wheel is installed there with --no-deps (its nvidia-* and
cuda-toolkit dependencies are several GB), so `import torch` -- which setup.py and torch.utils.cpp_extension need to
build fastmtl -- would fail on the missing libcudnn.so.9, libnccl.so.2, libcublas.so.13, ... For every library that
a file of torch/lib needs and that is found neither in torch/lib, the CUDA toolkit (lib64, extras/CUPTI/lib64) nor
the system, this writes a stub with the same soname, the same symbol versions and every symbol torch takes from it,
each a function that aborts if ever called. Nothing runs on a GPU here, so none is called: the stubs only let the
dynamic loader finish loading torch (and then fastmtl._C, whose own undefined symbols the check script verifies
against the real libraries, never the stubs).

usage: python cuda_stub_libs.py TORCH_LIB_DIR CUDA_HOME OUT_DIR   (prints the sonames it stubbed)
       python cuda_stub_libs.py --no-device TORCH_LIB_DIR OUT_DIR
           for running a CUDA torch wheel on the CPU (.ci/torch_window.sh): every CUDA library torch/lib needs that
           the system lacks (the CUDA toolkit is not searched) gets a stand-in whose functions all return 100
           (cudaErrorNoDevice, CUDA_ERROR_NO_DEVICE) instead of aborting, so that torch.cuda.is_available() is
           False and nothing else of torch notices
       python cuda_stub_libs.py --check EXTENSION.so TORCH_LIB_DIR CUDA_HOME STUB_DIR
           every library the extension needs is a real one (not a stand-in), and every strong undefined symbol of
           the extension is defined by those libraries or the real libraries they need
"""
import glob
import os
import re
import subprocess
import sys


def run(cmd):
    return subprocess.run(cmd, check=True, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True).stdout


def needed(lib):
    return re.findall(r"\(NEEDED\)\s+Shared library: \[([^\]]+)\]", run(["readelf", "-d", "-W", lib]))


def system_libs():
    """soname -> path of the libraries the system's loader cache knows (this architecture's first)."""
    out = {}
    for line in run(["ldconfig", "-p"]).splitlines():
        m = re.match(r"\s*(\S+) \(([^)]*)\) => (\S+)", line)
        if m and m.group(1) not in out:
            out[m.group(1)] = m.group(3)
    return out


def version_needs(lib):
    """version name -> file (soname) it is required from, from the .gnu.version_r section."""
    out, current = {}, None
    for line in run(["readelf", "-V", "-W", lib]).splitlines():
        m = re.search(r"File: (\S+)\s+Cnt:", line)
        if m:
            current = m.group(1)
            continue
        m = re.search(r"Name: (\S+)\s+Flags:", line)
        if m and current:
            out[m.group(1)] = current
    return out


def undefined(lib):
    """(name, version or None) of the strong undefined dynamic symbols of `lib`."""
    out = []
    for line in run(["nm", "-D", "--undefined-only", "--with-symbol-versions", lib]).splitlines():
        parts = line.split()
        if len(parts) != 2 or parts[0] != "U":
            continue  # weak (w, v) references may stay unresolved
        name, _, ver = parts[1].partition("@")
        out.append((name, ver.lstrip("@") or None))
    return out


def defined(lib):
    names = set()
    for line in run(["nm", "-D", "--defined-only", lib]).splitlines():
        parts = line.split()
        if len(parts) >= 3:
            names.add(parts[2].split("@")[0])
    return names


def _global(names):
    return "global: %s " % " ".join(n + ";" for n in names) if names else ""


def main(torch_lib, cuda_home, out_dir, no_device=False):
    os.makedirs(out_dir, exist_ok=True)
    search = [torch_lib]
    if cuda_home:
        search += [os.path.join(cuda_home, "lib64"), os.path.join(cuda_home, "extras", "CUPTI", "lib64")]
    sysl = system_libs()

    def find(soname):
        for d in search:
            p = os.path.join(d, soname)
            if os.path.exists(p):
                return p
        return sysl.get(soname)

    torch_files = sorted(p for p in glob.glob(os.path.join(torch_lib, "*.so*")) if os.path.isfile(p))
    torch_files += sorted(glob.glob(os.path.join(os.path.dirname(torch_lib), "_C*.so")))
    # every library reachable from torch's own files, and the sonames nobody provides
    found, missing, todo = {}, {}, list(torch_files)
    while todo:
        lib = todo.pop()
        for so in needed(lib):
            if so in found or so in missing:
                continue
            p = find(so)
            if p is None:
                missing[so] = []
            else:
                found[so] = p
                todo.append(p)
    if not missing:
        return []
    provided = set()
    for p in set(found.values()) | set(torch_files):
        provided |= defined(p)
    for lib in torch_files:
        vn = version_needs(lib)
        libs_missing = [so for so in needed(lib) if so in missing]
        if not libs_missing:
            continue
        for name, ver in undefined(lib):
            src = vn.get(ver) if ver else None
            if src in missing:
                missing[src].append((name, ver))
            elif src is None and name not in provided:
                missing[libs_missing[0]].append((name, None))  # unversioned: any library in its scope will do
    for so, syms in sorted(missing.items()):
        syms = sorted(set(syms), key=lambda s: s[0])
        versions = sorted({v for _, v in syms if v})
        stem = os.path.join(out_dir, re.sub(r"[^A-Za-z0-9_.]", "_", so))
        with open(stem + ".c", "w") as f:
            if no_device:
                f.write("/* generated by .ci/cuda_stub_libs.py --no-device: stand-in for %s; every function "
                        "answers 100 (no CUDA device) */\n" % so)
                for name, _ in syms:
                    f.write("int %s(void) { return 100; }\n" % name)
            else:
                f.write("/* generated by .ci/cuda_stub_libs.py: stand-in for %s, never called */\n" % so)
                f.write("#include <stdio.h>\n#include <stdlib.h>\n")
                f.write("static void fastmtl_stub_called(void) { fputs(\"fastmtl CI stub of %s called\\n\", "
                        "stderr); abort(); }\n" % so)
                for name, _ in syms:
                    f.write("void %s(void) { fastmtl_stub_called(); }\n" % name)
        with open(stem + ".map", "w") as f:
            unversioned = [n for n, v in syms if not v]
            for i, v in enumerate(versions):
                names = [n for n, vv in syms if vv == v] + (unversioned if i == 0 else [])
                f.write("%s { %slocal: *; };\n" % (v, _global(names)))
            if not versions:
                f.write("{ %slocal: *; };\n" % _global(unversioned))
        subprocess.run(["cc", "-shared", "-fPIC", "-w", "-o", os.path.join(out_dir, so), stem + ".c",
                        "-Wl,-soname," + so, "-Wl,--version-script=" + stem + ".map"], check=True)
    return sorted(missing)


def check(so, torch_lib, cuda_home, stub_dir):
    search = [torch_lib, os.path.join(cuda_home, "lib64"), os.path.join(cuda_home, "extras", "CUPTI", "lib64")]
    sysl = system_libs()
    stubbed = {os.path.basename(p) for p in glob.glob(os.path.join(stub_dir, "*.so*"))}
    errors, real, todo, seen = [], [], [so], set()
    while todo:
        lib = todo.pop()
        for dep in needed(lib):
            if dep in seen:
                continue
            seen.add(dep)
            path = next((os.path.join(d, dep) for d in search if os.path.exists(os.path.join(d, dep))), None)
            path = path or sysl.get(dep)
            if path is None:
                if lib == so:
                    errors.append("%s needs %s, which %s" % (os.path.basename(so), dep, "only a stand-in provides"
                                                              if dep in stubbed else "is nowhere to be found"))
                continue
            real.append(path)
            todo.append(path)
    # Python C-API symbols come from the interpreter that imports the extension (and its libpython, if shared)
    interp = [os.path.realpath(sys.executable)]
    interp += [sysl[d] for d in needed(interp[0]) if d.startswith("libpython") and d in sysl]
    provided = set()
    for p in real + interp:
        provided |= defined(p)
    syms = undefined(so)
    unresolved = sorted({n for n, _ in syms if n not in provided})
    if unresolved:
        errors.append("%d undefined symbols of %s are defined by no real library it loads:\n  %s" % (
            len(unresolved), os.path.basename(so), "\n  ".join(unresolved[:50])))
    for e in errors:
        print("cuda_stub_libs --check: " + e, file=sys.stderr)
    if not errors:
        print("symbols ok: %d undefined symbols of %s, all defined by the %d real libraries it loads (directly: %s)"
              % (len(syms), os.path.basename(so), len(real), " ".join(needed(so))))
    return not errors


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--no-device":
        print(" ".join(main(sys.argv[2], None, sys.argv[3], no_device=True)))
        sys.exit(0)
    if len(sys.argv) == 6 and sys.argv[1] == "--check":
        sys.exit(0 if check(*sys.argv[2:]) else 1)
    if len(sys.argv) != 4:
        sys.exit(__doc__)
    print(" ".join(main(*sys.argv[1:])))
