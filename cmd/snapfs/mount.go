package main

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/urfave/cli/v2"
	"golang.org/x/sys/unix"

	"github.com/snapfs/snapfs/fs"
	"github.com/snapfs/snapfs/objstore"
)

// daemonEnv marks the re-executed daemon: its value is the number of the
// file descriptor on which it reports readiness.
const daemonEnv = "SNAPFS_DAEMON_READY_FD"

// unmountGrace is how long SIGINT or SIGTERM lets open files finish after
// the mount is detached, before snapfs exits (they then fail).
const unmountGrace = 5 * time.Second

func mountCommand() *cli.Command {
	return &cli.Command{
		Name:      "mount",
		Usage:     "mount the images under a prefix (or one image) as raw disk files",
		ArgsUsage: "URL MOUNTPOINT",
		Description: "Every QCOW2 object under the URL's prefix appears as a read-only raw file of its " +
			"virtual size (NAME.qcow2 as NAME.raw), sub-prefixes as directories; a single image's URL " +
			"mounts as a directory holding that one file. Objects that are not QCOW2 are left out " +
			"(--raw-objects shows them as they are); images that cannot be served are listed with the " +
			"reason in .snapfs-errors. The listing is refreshed every --list-ttl; an open file keeps the " +
			"version it opened. Runs in the foreground until unmounted, SIGINT or SIGTERM (which " +
			"unmount), unless --daemon.",
		Flags: withGlobal(append(append(deviceFlags(), volumeFlags()...),
			&cli.DurationFlag{Name: "list-ttl", Value: fs.DefaultListTTL, Usage: "refresh the listing after `DURATION` (0: never)"},
			&cli.IntFlag{Name: "uid", Value: -1, DefaultText: "the mounting user", Usage: "owner of the files"},
			&cli.IntFlag{Name: "gid", Value: -1, DefaultText: "the mounting user's group", Usage: "group of the files"},
			&cli.BoolFlag{Name: "allow-other", Usage: "let other users access the mount (allow_other)"},
			&cli.BoolFlag{Name: "daemon", Usage: "go to the background once the mount is ready"},
			&cli.BoolFlag{Name: "raw-objects", Usage: "show objects that are not QCOW2 as they are"},
			&cli.StringFlag{Name: "log-file", Usage: "append the log to `FILE` instead of stderr (with --daemon the log is dropped otherwise)"},
			&cli.BoolFlag{Name: "debug-fuse", Hidden: true, Usage: "log every FUSE request"},
			&cli.StringFlag{Name: "volume", Usage: "mount the one image through the local volume `TARGET` (copy-on-read, no background copy; see snapfs import)"},
			&cli.BoolFlag{Name: "writable", Usage: "with --volume: mount read-write and let writes reach the volume"},
		)...),
		Action: runMount,
	}
}

func umountCommand() *cli.Command {
	return &cli.Command{
		Name:      "umount",
		Aliases:   []string{"unmount"},
		Usage:     "unmount a snapfs mount",
		ArgsUsage: "MOUNTPOINT",
		Description: "Fails while files are open on the mount, unless --lazy, which detaches it at once " +
			"(open files are served until they close, then the snapfs process exits).",
		Flags: withGlobal(
			&cli.BoolFlag{Name: "lazy", Aliases: []string{"z", "l"}, Usage: "detach now, even with files open"},
		),
		Action: func(c *cli.Context) error {
			if c.NArg() != 1 {
				return cli.Exit("umount takes one MOUNTPOINT (see snapfs umount --help)", 2)
			}
			return fs.Unmount(c.Args().First(), c.Bool("lazy"))
		},
	}
}

func runMount(c *cli.Context) error {
	if c.NArg() != 2 {
		return cli.Exit("mount takes a URL and a MOUNTPOINT (see snapfs mount --help)", 2)
	}
	u, dir := c.Args().Get(0), c.Args().Get(1)
	if fi, err := os.Stat(dir); err != nil {
		return err
	} else if !fi.IsDir() {
		return fmt.Errorf("%s: not a directory", dir)
	}
	if t, ok, _ := fs.MountType(absPath(dir)); ok && t == fs.FSType {
		return fmt.Errorf("%s: a snapfs mount is already there", dir)
	}

	readyFD := -1
	if v := os.Getenv(daemonEnv); v != "" {
		readyFD, _ = strconv.Atoi(v)
		os.Unsetenv(daemonEnv)
		signal.Ignore(syscall.SIGPIPE, syscall.SIGHUP)
	} else if c.Bool("daemon") {
		return daemonize(c.Context)
	}
	if p := c.String("log-file"); p != "" {
		if err := redirectStderr(p); err != nil {
			return err
		}
	}

	opts := fs.Options{
		UID:        uint32(os.Getuid()),
		GID:        uint32(os.Getgid()),
		ListTTL:    c.Duration("list-ttl"),
		RawObjects: c.Bool("raw-objects"),
		AllowOther: c.Bool("allow-other"),
		Logger:     slog.Default(),
		Debug:      c.Bool("debug-fuse"),
	}
	if opts.ListTTL == 0 {
		opts.ListTTL = -1 // never
	}
	if v := c.Int("uid"); v >= 0 {
		opts.UID = uint32(v)
	}
	if v := c.Int("gid"); v >= 0 {
		opts.GID = uint32(v)
	}
	devs, err := newDevices(c)
	if err != nil {
		return cli.Exit(err.Error(), 2)
	}
	defer devs.close()
	opts.OpenDevice = fs.DiskDevice(devs.opts)

	var m *fs.Mount
	if target := c.String("volume"); target != "" {
		st, key, err := openStoreWith(c, u, devs.metrics)
		if err != nil {
			return err
		}
		v, err := openVolume(c, st, key, target, c.Bool("writable"), devs.metrics)
		if err != nil {
			return err
		}
		defer v.Close()
		if m, err = mountVolume(c, st, key, v, dir); err != nil {
			return err
		}
	} else {
		st, key, err := openMountStore(c, u, devs.metrics)
		if err != nil {
			return err
		}
		fsys, err := fs.New(c.Context, st, key, opts)
		if err != nil {
			return err
		}
		m, err = fsys.Mount(dir, st.URL(key))
		if err != nil {
			fsys.Close()
			return err
		}
		slog.Info("mounted", "source", st.URL(key), "mountpoint", m.Dir())
	}
	if readyFD >= 0 {
		ready := os.NewFile(uintptr(readyFD), "ready")
		fmt.Fprintln(ready, "ready")
		ready.Close()
		if c.String("log-file") == "" {
			// Nobody reads the starting terminal any more.
			if null, err := os.OpenFile(os.DevNull, os.O_WRONLY, 0); err == nil {
				unix.Dup2(int(null.Fd()), 2)
				null.Close()
			}
		}
	}

	select {
	case <-m.Done():
		slog.Info("unmounted", "mountpoint", m.Dir())
		return m.Wait()
	case <-c.Context.Done():
	}
	slog.Info("signal: unmounting", "mountpoint", m.Dir())
	ctx, cancel := context.WithTimeout(context.Background(), unmountGrace)
	defer cancel()
	if err := m.Unmount(ctx); err != nil {
		slog.Warn("exiting with files still open on the detached mount; they fail from now on", "mountpoint", m.Dir(), "err", err)
	}
	return nil
}

// openMountStore opens the store behind rawURL with retries but without
// one store-wide ETag pin: the file system pins each object version it
// opens, so that a replaced object can show its new version.
func openMountStore(c *cli.Context, rawURL string, m *objstore.Metrics) (objstore.Store, string, error) {
	st, key, err := objstore.Open(c.Context, rawURL, storeConfig(c))
	if err != nil {
		return nil, "", err
	}
	if m != nil {
		st = objstore.WithMetrics(st, m)
	}
	attempts := max(gInt(c, "retries"), 1)
	st = objstore.WithRetry(st, objstore.RetryPolicy{MaxAttempts: attempts, MaxDelay: 5 * time.Second, Logger: slog.Default()})
	return st, key, nil
}

// daemonize runs this command again in the background, in a new session,
// and returns once it reports the mount ready (exit 0), or fails with its
// status when it exits before.
func daemonize(ctx context.Context) error {
	exe, err := os.Executable()
	if err != nil {
		return err
	}
	r, w, err := os.Pipe()
	if err != nil {
		return err
	}
	null, err := os.OpenFile(os.DevNull, os.O_RDWR, 0)
	if err != nil {
		return err
	}
	defer null.Close()
	cmd := exec.Command(exe, os.Args[1:]...)
	cmd.Env = append(os.Environ(), daemonEnv+"=3")
	cmd.Stdin, cmd.Stdout, cmd.Stderr = null, null, os.Stderr
	cmd.ExtraFiles = []*os.File{w}
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	if err := cmd.Start(); err != nil {
		r.Close()
		w.Close()
		return err
	}
	w.Close()
	line := make(chan string, 1)
	go func() {
		s, _ := bufio.NewReader(r).ReadString('\n')
		r.Close()
		line <- s
	}()
	select {
	case s := <-line:
		if strings.TrimSpace(s) == "ready" {
			cmd.Process.Release()
			return nil
		}
	case <-ctx.Done():
		cmd.Process.Signal(syscall.SIGTERM)
		cmd.Wait()
		return cli.Exit("interrupted before the mount was ready", 1)
	}
	err = cmd.Wait()
	var ee *exec.ExitError
	if errors.As(err, &ee) && ee.ExitCode() > 0 {
		return cli.Exit("", ee.ExitCode())
	}
	if err == nil {
		err = errors.New("exited before the mount was ready")
	}
	return fmt.Errorf("background mount: %w", err)
}

// redirectStderr points file descriptor 2 (and so the log) at path,
// appending.
func redirectStderr(path string) error {
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o644)
	if err != nil {
		return fmt.Errorf("--log-file: %w", err)
	}
	defer f.Close()
	return unix.Dup2(int(f.Fd()), 2)
}

func absPath(p string) string {
	if a, err := filepath.Abs(p); err == nil {
		return a
	}
	return p
}
