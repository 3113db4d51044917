package main

import (
	"context"
	"fmt"
	"log/slog"
	"os"
	"strings"
	"time"

	"github.com/urfave/cli/v2"

	"github.com/snapfs/snapfs/objstore"
	"github.com/snapfs/snapfs/qcow2"
)

// globalFlags are accepted before the command and after it.
func globalFlags() []cli.Flag {
	return []cli.Flag{
		&cli.StringFlag{Name: "endpoint", Usage: "S3 endpoint URL (default: $AWS_ENDPOINT_URL, else AWS)", EnvVars: []string{"SNAPFS_ENDPOINT"}},
		&cli.StringFlag{Name: "region", Usage: "S3 region (default: $AWS_REGION, else us-east-1)"},
		&cli.BoolFlag{Name: "path-style", Usage: "force path-style S3 requests (default: automatic)"},
		&cli.BoolFlag{Name: "insecure", Usage: "do not verify TLS certificates"},
		&cli.IntFlag{Name: "retries", Value: 8, Usage: "attempts per object-store request before giving up"},
		&cli.StringFlag{Name: "log-level", Value: "warn", Usage: "debug, info, warn or error"},
	}
}

// withGlobal appends the global flags to a command's own.
func withGlobal(flags ...cli.Flag) []cli.Flag { return append(flags, globalFlags()...) }

// setBy returns the context in c's lineage where name was set on the
// command line, or c when it was set nowhere.
func setBy(c *cli.Context, name string) *cli.Context {
	for _, x := range c.Lineage() {
		if x == nil {
			continue
		}
		for _, n := range x.LocalFlagNames() {
			if n == name {
				return x
			}
		}
	}
	return c
}

func gString(c *cli.Context, name string) string { return setBy(c, name).String(name) }
func gInt(c *cli.Context, name string) int       { return setBy(c, name).Int(name) }
func gBool(c *cli.Context, name string) bool     { return setBy(c, name).Bool(name) }
func gSet(c *cli.Context, name string) bool      { return setBy(c, name) != c || c.IsSet(name) }

func setupLogging(c *cli.Context) error {
	var level slog.Level
	if err := level.UnmarshalText([]byte(gString(c, "log-level"))); err != nil {
		return fmt.Errorf("--log-level: %w", err)
	}
	slog.SetDefault(slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: level})))
	return nil
}

// storeConfig builds the object-store configuration from the flags.
func storeConfig(c *cli.Context) objstore.Config {
	cfg := objstore.Config{
		Endpoint: gString(c, "endpoint"),
		Region:   gString(c, "region"),
		Insecure: gBool(c, "insecure"),
	}
	if gSet(c, "path-style") {
		if gBool(c, "path-style") {
			cfg.PathStyle = objstore.PathStyleOn
		} else {
			cfg.PathStyle = objstore.PathStyleOff
		}
	}
	return cfg
}

// openStore opens the store behind rawURL, wrapped with retries and ETag
// pinning, and returns it with the key.
func openStore(c *cli.Context, rawURL string) (objstore.Store, string, error) {
	return openStoreWith(c, rawURL, nil)
}

// openStoreWith is openStore counting requests in m when m is not nil.
func openStoreWith(c *cli.Context, rawURL string, m *objstore.Metrics) (objstore.Store, string, error) {
	if gSet(c, "log-level") {
		if err := setupLogging(c); err != nil {
			return nil, "", err
		}
	}
	st, key, err := objstore.Open(c.Context, rawURL, storeConfig(c))
	if err != nil {
		return nil, "", err
	}
	if m != nil {
		st = objstore.WithMetrics(st, m)
	}
	attempts := gInt(c, "retries")
	if attempts < 1 {
		attempts = 1
	}
	st = objstore.WithRetry(st, objstore.RetryPolicy{MaxAttempts: attempts, MaxDelay: 5 * time.Second, Logger: slog.Default()})
	return objstore.WithPinning(st), key, nil
}

// openImage opens the QCOW2 image at rawURL for reading.
func openImage(c *cli.Context, rawURL string) (*qcow2.Image, error) {
	st, key, err := openStore(c, rawURL)
	if err != nil {
		return nil, err
	}
	if key == "" || strings.HasSuffix(key, "/") {
		return nil, fmt.Errorf("%s: names a prefix, not an image", st.URL(key))
	}
	return qcow2.Open(c.Context, st, key, nil)
}

// withImage adapts an action on one opened image to a command taking one
// URL: it opens the image and closes it when the action returns.
func withImage(action func(*cli.Context, *qcow2.Image) error) cli.ActionFunc {
	return func(c *cli.Context) error {
		u, err := oneURL(c)
		if err != nil {
			return err
		}
		im, err := openImage(c, u)
		if err != nil {
			return err
		}
		defer im.Close()
		return action(c, im)
	}
}

// oneURL returns the single URL argument of c.
func oneURL(c *cli.Context) (string, error) {
	if c.NArg() != 1 {
		return "", cli.Exit(fmt.Sprintf("%s takes one URL (see snapfs %s --help)", c.Command.Name, c.Command.Name), 2)
	}
	return c.Args().First(), nil
}

var _ = context.Background
