// Command snapfs serves QCOW2 disk images that sit in object stores: it
// describes them (info, map, check) and reads their raw content (cat).
package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/signal"
	"syscall"

	"github.com/urfave/cli/v2"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	app := newApp()
	err := app.RunContext(ctx, interspersed(app, os.Args))
	stop()
	os.Exit(exitCode(err))
}

// exitCode prints err and maps it to the process exit status.
func exitCode(err error) int {
	if err == nil {
		return 0
	}
	var ec cli.ExitCoder
	if errors.As(err, &ec) {
		if msg := ec.Error(); msg != "" {
			fmt.Fprintf(os.Stderr, "snapfs: %s\n", msg)
		}
		return ec.ExitCode()
	}
	fmt.Fprintf(os.Stderr, "snapfs: %v\n", err)
	return 1
}

func newApp() *cli.App {
	return &cli.App{
		Name:                 "snapfs",
		Usage:                "serve QCOW2 images from object stores as raw disks",
		UsageText:            "snapfs [global options] command [options] URL\n\nURL is s3://bucket/key, an http(s):// URL (pre-signed or public), file:///dir/key or a plain path.",
		Flags:                globalFlags(),
		Before:               setupLogging,
		EnableBashCompletion: true,
		HideHelpCommand:      true,
		ExitErrHandler:       func(*cli.Context, error) {},
		Commands: []*cli.Command{
			infoCommand(),
			mapCommand(),
			checkCommand(),
			catCommand(),
			serveCommand(),
			attachCommand(),
			demoCommand(),
			mountCommand(),
			umountCommand(),
			importCommand(),
			statusCommand(),
			exportCommand(),
			digestCommand(),
		},
	}
}
