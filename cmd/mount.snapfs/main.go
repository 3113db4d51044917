// Command mount.snapfs is the mount(8) helper of snapfs, so that
//
//	mount -t fuse.snapfs s3://bucket/snapshots/ /mnt/snaps -o allow_other,list_ttl=30s
//
// and /etc/fstab lines such as
//
//	s3://bucket/snapshots/  /mnt/snaps  fuse.snapfs  ro,allow_other,_netdev,log_file=/var/log/snapfs.log  0 0
//
// work. mount(8) looks for /sbin/mount.fuse.snapfs (for -t fuse.snapfs) or
// /sbin/mount.snapfs (for -t snapfs): install this program under both names
// next to the snapfs binary. It is called as
//
//	mount.snapfs SOURCE MOUNTPOINT [-sfnv] [-N NAMESPACE] [-o OPTIONS] [-t TYPE]
//
// and runs `snapfs mount --daemon` with the options translated to flags;
// it returns once the mount is ready.
//
// Options: allow_other; uid=N, gid=N; cache_size=BYTES, min_get=BYTES,
// max_inflight=N (the disk layer); list_ttl=DURATION (seconds when a bare
// number); raw_objects; endpoint=URL, region=NAME,
// path_style, insecure, retries=N (the object store); profile=NAME (the
// AWS profile); log_level=LEVEL, log_file=FILE. Generic mount options
// (rw, ro, defaults, noauto, _netdev, nofail, nosuid, x-*...) are accepted
// and ignored: snapfs mounts are always read-only, nosuid and nodev.
// Unknown options are an error, or ignored with -s (sloppy).
package main

import (
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
)

// helperArgs is the command line mount(8) passes.
type helperArgs struct {
	source, dir string
	options     []string
	fake        bool // -f: do everything but mount
	verbose     bool // -v
	sloppy      bool // -s: tolerate unknown options
}

// parseArgs parses the helper's arguments.
func parseArgs(args []string) (*helperArgs, error) {
	h := &helperArgs{}
	var pos []string
	for i := 0; i < len(args); i++ {
		a := args[i]
		switch {
		case a == "--":
			pos = append(pos, args[i+1:]...)
			i = len(args)
		case a == "-o" || a == "-t" || a == "-N":
			if i+1 >= len(args) {
				return nil, fmt.Errorf("%s needs a value", a)
			}
			i++
			if a == "-o" {
				h.options = append(h.options, splitOptions(args[i])...)
			}
		case strings.HasPrefix(a, "-o"):
			h.options = append(h.options, splitOptions(a[2:])...)
		case strings.HasPrefix(a, "-t") || strings.HasPrefix(a, "-N"):
			// type or namespace given inline: nothing to do
		case strings.HasPrefix(a, "-") && len(a) > 1:
			for _, c := range a[1:] {
				switch c {
				case 's':
					h.sloppy = true
				case 'f':
					h.fake = true
				case 'n':
				case 'v':
					h.verbose = true
				case 'r':
					// read-only: snapfs always is
				case 'w':
					// read-write requested: refused in translate
					h.options = append(h.options, "rw!")
				default:
					return nil, fmt.Errorf("unknown flag -%c", c)
				}
			}
		default:
			pos = append(pos, a)
		}
	}
	if len(pos) != 2 {
		return nil, fmt.Errorf("want SOURCE and MOUNTPOINT, got %d arguments", len(pos))
	}
	h.source, h.dir = pos[0], pos[1]
	return h, nil
}

// splitOptions splits a comma-separated option list, dropping empty items.
func splitOptions(s string) []string {
	var out []string
	for _, o := range strings.Split(s, ",") {
		if o = strings.TrimSpace(o); o != "" {
			out = append(out, o)
		}
	}
	return out
}

// ignored are the generic mount options that snapfs accepts and ignores.
var ignored = map[string]bool{
	"rw": true, "ro": true, "defaults": true, "auto": true, "noauto": true,
	"user": true, "users": true, "nouser": true, "owner": true, "group": true,
	"_netdev": true, "nofail": true, "suid": true, "nosuid": true, "dev": true,
	"nodev": true, "exec": true, "noexec": true, "atime": true, "noatime": true,
	"relatime": true, "norelatime": true, "strictatime": true, "nostrictatime": true,
	"diratime": true, "nodiratime": true, "lazytime": true, "nolazytime": true,
	"sync": true, "async": true, "dirsync": true, "silent": true, "loud": true,
	"default_permissions": true, "bg": true, "fg": true,
}

// ignoredPrefixes are option prefixes accepted and ignored (userspace
// options of mount(8) and systemd, and FUSE's own naming options).
var ignoredPrefixes = []string{"x-", "comment=", "fsname=", "subtype=", "helper="}

// translate turns the helper's arguments into the snapfs command line
// (after the program name) and the environment additions.
func translate(h *helperArgs) (args, env []string, warnings []string, err error) {
	args = []string{"mount", "--daemon"}
	for _, o := range h.options {
		name, val, hasVal := strings.Cut(o, "=")
		need := func() bool {
			if !hasVal || val == "" {
				err = fmt.Errorf("option %s needs a value (%s=...)", name, name)
				return false
			}
			return true
		}
		flag := func(f string) {
			if hasVal {
				err = fmt.Errorf("option %s takes no value", name)
				return
			}
			args = append(args, f)
		}
		switch {
		case o == "rw!":
			return nil, nil, nil, errors.New("snapfs mounts are read-only")
		case name == "allow_other":
			flag("--allow-other")
		case name == "raw_objects":
			flag("--raw-objects")
		case name == "path_style":
			flag("--path-style")
		case name == "insecure":
			flag("--insecure")
		case name == "uid" || name == "gid" || name == "retries":
			if need() {
				if _, perr := strconv.ParseUint(val, 10, 32); perr != nil {
					err = fmt.Errorf("option %s=%s: want a number", name, val)
				} else {
					args = append(args, "--"+name, val)
				}
			}
		case name == "cache_size" || name == "min_get":
			if need() {
				args = append(args, "--"+strings.ReplaceAll(name, "_", "-"), val)
			}
		case name == "max_inflight":
			if need() {
				if _, perr := strconv.ParseUint(val, 10, 31); perr != nil {
					err = fmt.Errorf("option %s=%s: want a number", name, val)
				} else {
					args = append(args, "--max-inflight", val)
				}
			}
		case name == "list_ttl":
			if need() {
				if _, perr := strconv.ParseUint(val, 10, 63); perr == nil {
					val += "s"
				}
				args = append(args, "--list-ttl", val)
			}
		case name == "endpoint" || name == "region":
			if need() {
				args = append(args, "--"+name, val)
			}
		case name == "log_level":
			if need() {
				args = append(args, "--log-level", val)
			}
		case name == "log_file":
			if need() {
				args = append(args, "--log-file", val)
			}
		case name == "profile":
			if need() {
				env = append(env, "AWS_PROFILE="+val)
			}
		case ignored[o]:
		case hasPrefix(o, ignoredPrefixes):
		case h.sloppy:
			warnings = append(warnings, "ignoring unknown option "+o)
		default:
			return nil, nil, nil, fmt.Errorf("unknown option %q", o)
		}
		if err != nil {
			return nil, nil, nil, err
		}
	}
	args = append(args, "--", h.source, h.dir)
	return args, env, warnings, nil
}

func hasPrefix(s string, prefixes []string) bool {
	for _, p := range prefixes {
		if strings.HasPrefix(s, p) {
			return true
		}
	}
	return false
}

// findSnapfs returns the snapfs program: $SNAPFS_PROGRAM, else snapfs
// next to this helper, else on $PATH, else in /usr/local/bin or /usr/bin.
func findSnapfs() (string, error) {
	if p := os.Getenv("SNAPFS_PROGRAM"); p != "" {
		return p, nil
	}
	if exe, err := os.Executable(); err == nil {
		if real, err := filepath.EvalSymlinks(exe); err == nil {
			exe = real
		}
		p := filepath.Join(filepath.Dir(exe), "snapfs")
		if isExecutable(p) {
			return p, nil
		}
	}
	if p, err := exec.LookPath("snapfs"); err == nil {
		return p, nil
	}
	for _, p := range []string{"/usr/local/bin/snapfs", "/usr/bin/snapfs", "/usr/local/sbin/snapfs", "/usr/sbin/snapfs"} {
		if isExecutable(p) {
			return p, nil
		}
	}
	return "", errors.New("the snapfs program was not found next to this helper, on $PATH or in /usr/local/bin")
}

func isExecutable(p string) bool {
	fi, err := os.Stat(p)
	return err == nil && !fi.IsDir() && fi.Mode()&0o111 != 0
}

func main() {
	name := filepath.Base(os.Args[0])
	fail := func(code int, format string, a ...any) {
		fmt.Fprintf(os.Stderr, "%s: %s\n", name, fmt.Sprintf(format, a...))
		os.Exit(code)
	}
	if len(os.Args) == 2 && (os.Args[1] == "-h" || os.Args[1] == "--help") {
		fmt.Printf("usage: %s SOURCE MOUNTPOINT [-sfnv] [-o OPTIONS]\n", name)
		os.Exit(0)
	}
	h, err := parseArgs(os.Args[1:])
	if err != nil {
		fail(1, "%v\nusage: %s SOURCE MOUNTPOINT [-sfnv] [-o OPTIONS]", err, name)
	}
	args, env, warnings, err := translate(h)
	if err != nil {
		fail(1, "%v", err)
	}
	for _, w := range warnings {
		fmt.Fprintf(os.Stderr, "%s: %s\n", name, w)
	}
	prog, err := findSnapfs()
	if err != nil {
		fail(1, "%v", err)
	}
	if h.verbose || h.fake {
		fmt.Fprintf(os.Stderr, "%s: %s %s\n", name, prog, strings.Join(args, " "))
	}
	if h.fake {
		os.Exit(0)
	}
	// mount(8) may run helpers with a minimal PATH; fusermount3 is
	// needed by non-root mounts.
	if os.Getenv("PATH") == "" {
		env = append(env, "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
	}
	if err := syscall.Exec(prog, append([]string{"snapfs"}, args...), append(os.Environ(), env...)); err != nil {
		fail(1, "exec %s: %v", prog, err)
	}
}
