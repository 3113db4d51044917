package main

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"strings"
	"time"

	"github.com/urfave/cli/v2"

	"github.com/snapfs/snapfs/disk"
	"github.com/snapfs/snapfs/nbd"
)

func serveCommand() *cli.Command {
	return &cli.Command{
		Name:      "serve",
		Usage:     "export images as NBD devices (read-only), fetched lazily",
		ArgsUsage: "[NAME=]URL...",
		Description: "Each URL is an image (export name: the key's base name, or NAME) or a prefix " +
			"ending in / (every image under it, named by its path below the prefix). With a " +
			"single image the empty export name selects it, as with qemu-nbd.",
		Flags: withGlobal(append(append(deviceFlags(), volumeFlags()...),
			&cli.StringFlag{Name: "listen", Value: "127.0.0.1:10809", Usage: "TCP `ADDR` to listen on"},
			&cli.StringFlag{Name: "socket", Usage: "unix socket `PATH` to listen on (instead of TCP unless --listen is given)"},
			&cli.StringFlag{Name: "tls-cert", Usage: "TLS certificate `FILE` (PEM) for STARTTLS"},
			&cli.StringFlag{Name: "tls-key", Usage: "TLS key `FILE` (PEM)"},
			&cli.StringFlag{Name: "tls", Usage: "off, allow or require (default: allow with a certificate, else off)"},
			&cli.StringFlag{Name: "description", Usage: "export description shown to clients"},
			&cli.StringFlag{Name: "metrics", Usage: "serve Prometheus metrics at http://`ADDR`/metrics"},
			&cli.StringFlag{Name: "volume", Usage: "serve the one image through the local volume `TARGET` (copy-on-read, no background copy; see snapfs import)"},
			&cli.BoolFlag{Name: "writable", Usage: "with --volume: let clients write the volume"},
		)...),
		Action: runServe,
	}
}

// splitNamed splits "name=URL"; a URL's own '=' (in a query) is not taken
// for a name because a name has no '/' or ':'.
func splitNamed(arg string) (name, rawURL string) {
	if i := strings.IndexByte(arg, '='); i > 0 && !strings.ContainsAny(arg[:i], "/:?") {
		return arg[:i], arg[i+1:]
	}
	return "", arg
}

func runServe(c *cli.Context) error {
	if c.NArg() == 0 {
		return cli.Exit("serve needs at least one URL (see snapfs serve --help)", 2)
	}
	devs, err := newDevices(c)
	if err != nil {
		return err
	}
	defer devs.close() // after the devices below, which use its cache
	var exports []nbd.Export
	var closers []func()
	defer func() {
		for _, f := range closers {
			f()
		}
	}()
	seen := map[string]string{}
	add := func(name, src string, dev disk.Device) error {
		if prev, dup := seen[name]; dup {
			return fmt.Errorf("export name %q given to both %s and %s", name, prev, src)
		}
		seen[name] = src
		desc := c.String("description")
		if desc == "" {
			desc = src
		}
		exports = append(exports, nbd.Export{Name: name, Description: desc, Device: dev})
		return nil
	}
	for _, arg := range c.Args().Slice() {
		name, u := splitNamed(arg)
		st, key, err := devs.store(c, u)
		if err != nil {
			return err
		}
		if key == "" || strings.HasSuffix(key, "/") {
			all, err := devs.openAll(c.Context, st, key)
			if err != nil {
				return err
			}
			logSkipped(all)
			for _, f := range all {
				if f.dev == nil {
					continue
				}
				closers = append(closers, func() { f.dev.Close() })
				n := exportName(key, f.key)
				if name != "" {
					n = name + "/" + n
				}
				if err := add(n, st.URL(f.key), f.dev); err != nil {
					return err
				}
			}
			continue
		}
		var dev disk.Device
		if target := c.String("volume"); target != "" {
			if c.NArg() != 1 {
				return cli.Exit("--volume serves exactly one image URL", 2)
			}
			v, err := openVolume(c, st, key, target, c.Bool("writable"), devs.metrics)
			if err != nil {
				return err
			}
			dev = v.dev
			closers = append(closers, func() { v.Close() })
		} else {
			d, err := devs.open(c.Context, st, key)
			if err != nil {
				return err
			}
			dev = d
			closers = append(closers, func() { d.Close() })
		}
		if name == "" {
			name = exportName("", key)
		}
		if err := add(name, st.URL(key), dev); err != nil {
			return err
		}
	}
	if len(exports) == 0 {
		return errors.New("no image to serve: nothing under the given prefixes is a servable QCOW2 image")
	}

	if addr := c.String("metrics"); addr != "" {
		if err := serveMetrics(addr, devs); err != nil {
			return err
		}
	}
	return serveNBD(c, exports, nil)
}

// serveNBD serves exports on --socket and/or --listen until the context
// ends (then it shuts the server down) or, when done is not nil, until
// done yields an error, which it returns.
func serveNBD(c *cli.Context, exports []nbd.Export, done <-chan error) error {
	srv := &nbd.Server{Exports: nbd.ExportList(exports...), Logger: slog.Default()}
	if err := configureTLS(c, srv); err != nil {
		return err
	}
	var listeners []net.Listener
	if p := c.String("socket"); p != "" {
		_ = os.Remove(p)
		l, err := net.Listen("unix", p)
		if err != nil {
			return err
		}
		listeners = append(listeners, l)
	}
	if c.String("socket") == "" || c.IsSet("listen") {
		l, err := net.Listen("tcp", c.String("listen"))
		if err != nil {
			return err
		}
		listeners = append(listeners, l)
	}
	errc := make(chan error, len(listeners))
	for _, l := range listeners {
		go func() { errc <- srv.Serve(l) }()
		names := make([]string, 0, len(exports))
		for _, e := range exports {
			names = append(names, fmt.Sprintf("%q", e.Name))
		}
		fmt.Fprintf(os.Stderr, "snapfs: serving %s on nbd://%s (%s)\n", strings.Join(names, ", "), l.Addr(), l.Addr().Network())
	}
	select {
	case err := <-errc:
		return err
	case err := <-done:
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		_ = srv.Shutdown(ctx)
		return err
	case <-c.Context.Done():
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := srv.Shutdown(ctx); err != nil && !errors.Is(err, nbd.ErrServerClosed) {
		return err
	}
	return nil
}

// configureTLS sets the server's TLS mode from --tls, --tls-cert, --tls-key.
func configureTLS(c *cli.Context, srv *nbd.Server) error {
	cert, key := c.String("tls-cert"), c.String("tls-key")
	mode := c.String("tls")
	if mode == "" {
		mode = "off"
		if cert != "" {
			mode = "allow"
		}
	}
	switch mode {
	case "off":
		srv.TLSMode = nbd.TLSOff
		return nil
	case "allow":
		srv.TLSMode = nbd.TLSAllow
	case "require":
		srv.TLSMode = nbd.TLSRequire
	default:
		return fmt.Errorf("--tls %q: want off, allow or require", mode)
	}
	if cert == "" || key == "" {
		return fmt.Errorf("--tls=%s needs --tls-cert and --tls-key", mode)
	}
	pair, err := tls.LoadX509KeyPair(cert, key)
	if err != nil {
		return fmt.Errorf("TLS certificate: %w", err)
	}
	srv.TLSConfig = &tls.Config{Certificates: []tls.Certificate{pair}, MinVersion: tls.VersionTLS12}
	return nil
}
