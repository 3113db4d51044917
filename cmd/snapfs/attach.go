package main

import (
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"syscall"

	"github.com/pojntfx/go-nbd/pkg/client"
	"github.com/urfave/cli/v2"

	"github.com/snapfs/snapfs/nbd"
)

func attachCommand() *cli.Command {
	return &cli.Command{
		Name:      "attach",
		Usage:     "attach an image to a kernel NBD device (/dev/nbdX), read-only",
		ArgsUsage: "URL /dev/nbdX",
		Description: "Serves the image in-process and hands one end of a socket pair to the " +
			"kernel's NBD client. Runs until interrupted, then detaches. Needs the nbd module.",
		Flags:  withGlobal(deviceFlags()...),
		Action: runAttach,
	}
}

func runAttach(c *cli.Context) error {
	if c.NArg() != 2 {
		return cli.Exit("attach takes URL and /dev/nbdX", 2)
	}
	u, devPath := c.Args().Get(0), c.Args().Get(1)
	if _, err := os.Stat(devPath); err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return fmt.Errorf("%s does not exist: load the kernel's nbd module (modprobe nbd)", devPath)
		}
		return err
	}
	devs, err := newDevices(c)
	if err != nil {
		return err
	}
	defer devs.close()
	st, key, err := devs.store(c, u)
	if err != nil {
		return err
	}
	dev, err := devs.open(c.Context, st, key)
	if err != nil {
		return err
	}
	defer dev.Close()

	fds, err := syscall.Socketpair(syscall.AF_UNIX, syscall.SOCK_STREAM|syscall.SOCK_CLOEXEC, 0)
	if err != nil {
		return err
	}
	serverConn, err := fileConn(fds[0], "nbd-server")
	if err != nil {
		return err
	}
	clientConn, err := fileConn(fds[1], "nbd-client")
	if err != nil {
		serverConn.Close()
		return err
	}
	defer clientConn.Close()
	srv := &nbd.Server{Exports: nbd.ExportList(nbd.Export{Name: "snapfs", Description: st.URL(key), Device: dev}), Logger: slog.Default()}
	go srv.ServeConn(c.Context, serverConn)
	defer srv.Close()

	f, err := os.OpenFile(devPath, os.O_RDWR, 0)
	if err != nil {
		return err
	}
	defer f.Close()
	done := make(chan error, 1)
	go func() {
		done <- client.Connect(clientConn, f, &client.Options{
			ExportName:  "snapfs",
			BlockSize:   4096,
			OnConnected: func() { fmt.Fprintf(os.Stderr, "snapfs: %s attached to %s\n", st.URL(key), devPath) },
		})
	}()
	select {
	case err := <-done:
		return err
	case <-c.Context.Done():
		if err := client.Disconnect(f); err != nil {
			return fmt.Errorf("detach %s: %w", devPath, err)
		}
		return <-done
	}
}

// fileConn turns a socket descriptor into a net.Conn.
func fileConn(fd int, name string) (net.Conn, error) {
	f := os.NewFile(uintptr(fd), name)
	defer f.Close()
	return net.FileConn(f)
}
