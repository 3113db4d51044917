package main

import (
	"slices"
	"strings"
	"testing"
)

func TestParseArgs(t *testing.T) {
	for _, c := range []struct {
		args []string
		want helperArgs
	}{
		// As mount(8) calls helpers: source, directory, flags, -o.
		{[]string{"s3://b/p/", "/mnt/s", "-o", "rw,allow_other"},
			helperArgs{source: "s3://b/p/", dir: "/mnt/s", options: []string{"rw", "allow_other"}}},
		{[]string{"s3://b/p/", "/mnt/s", "-sfnv", "-N", "/proc/1/ns/mnt", "-o", "ro", "-t", "fuse.snapfs"},
			helperArgs{source: "s3://b/p/", dir: "/mnt/s", options: []string{"ro"}, sloppy: true, fake: true, verbose: true}},
		// Options before the operands, inline, repeated, with empty items.
		{[]string{"-oallow_other,,uid=3", "-o", "gid=4", "file:///srv/img", "/m"},
			helperArgs{source: "file:///srv/img", dir: "/m", options: []string{"allow_other", "uid=3", "gid=4"}}},
		{[]string{"-o", "ro", "--", "-odd-source", "/m"},
			helperArgs{source: "-odd-source", dir: "/m", options: []string{"ro"}}},
	} {
		got, err := parseArgs(c.args)
		if err != nil {
			t.Errorf("%q: %v", c.args, err)
			continue
		}
		if got.source != c.want.source || got.dir != c.want.dir || !slices.Equal(got.options, c.want.options) ||
			got.sloppy != c.want.sloppy || got.fake != c.want.fake || got.verbose != c.want.verbose {
			t.Errorf("%q: got %+v, want %+v", c.args, *got, c.want)
		}
	}
	for _, bad := range [][]string{{"only-source"}, {"a", "b", "c"}, {"a", "b", "-o"}, {"a", "b", "-q"}} {
		if _, err := parseArgs(bad); err == nil {
			t.Errorf("%q: accepted", bad)
		}
	}
}

func TestTranslate(t *testing.T) {
	h := &helperArgs{source: "s3://bucket/snaps/", dir: "/mnt/snaps", options: []string{
		"rw", "defaults", "noauto", "_netdev", "nofail", "nosuid", "nodev", "x-systemd.automount", "comment=x",
		"allow_other", "uid=1000", "gid=100", "cache_size=2G", "min_get=1MiB", "max_inflight=32", "list_ttl=30", "raw_objects",
		"endpoint=http://127.0.0.1:9000", "region=eu-west-1", "path_style", "insecure", "retries=3",
		"log_level=info", "log_file=/var/log/snapfs.log", "profile=backup",
	}}
	args, env, warnings, err := translate(h)
	if err != nil {
		t.Fatal(err)
	}
	want := "mount --daemon --allow-other --uid 1000 --gid 100 --cache-size 2G --min-get 1MiB --max-inflight 32 --list-ttl 30s --raw-objects " +
		"--endpoint http://127.0.0.1:9000 --region eu-west-1 --path-style --insecure --retries 3 " +
		"--log-level info --log-file /var/log/snapfs.log -- s3://bucket/snaps/ /mnt/snaps"
	if got := strings.Join(args, " "); got != want {
		t.Errorf("args\n %s\nwant\n %s", got, want)
	}
	if !slices.Equal(env, []string{"AWS_PROFILE=backup"}) || len(warnings) != 0 {
		t.Errorf("env %q warnings %q", env, warnings)
	}
	// A duration keeps its unit.
	args, _, _, err = translate(&helperArgs{source: "s", dir: "d", options: []string{"list_ttl=2m30s"}})
	if err != nil || !slices.Contains(args, "2m30s") {
		t.Errorf("list_ttl=2m30s: %q %v", args, err)
	}

	for opt, msg := range map[string]string{
		"bogus":            `unknown option "bogus"`,
		"uid=alice":        "want a number",
		"uid":              "needs a value",
		"allow_other=yes":  "takes no value",
		"log_file=":        "needs a value",
		"rw!":              "read-only",
		"cache_size":       "needs a value",
		"endpoint":         "needs a value",
		"raw_objects=true": "takes no value",
		"max_inflight=-1":  "want a number",
	} {
		_, _, _, err := translate(&helperArgs{source: "s", dir: "d", options: []string{opt}})
		if err == nil || !strings.Contains(err.Error(), msg) {
			t.Errorf("%s: %v, want %q", opt, err, msg)
		}
	}
	// -s: unknown options are ignored, with a warning.
	args, _, warnings, err = translate(&helperArgs{source: "s", dir: "d", sloppy: true, options: []string{"bogus", "allow_other"}})
	if err != nil || len(warnings) != 1 || !strings.Contains(warnings[0], "bogus") || !slices.Contains(args, "--allow-other") {
		t.Errorf("sloppy: %q %q %v", args, warnings, err)
	}
}
