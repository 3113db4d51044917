package main

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"path/filepath"

	"github.com/urfave/cli/v2"

	"github.com/snapfs/snapfs/qcow2"
)

func demoCommand() *cli.Command {
	return &cli.Command{
		Name:      "demo",
		Usage:     "make a sample image in a file:// bucket, then show info, map and a verified read-back",
		ArgsUsage: "[DIR]",
		Description: "DIR (default ./demo-bucket) plays the bucket: a directory is snapfs's embedded " +
			"object store, so the demo needs no server and no qemu-img.",
		Action: runDemo,
	}
}

// demoSize is the virtual size of the demo image.
const demoSize = 64 << 20

// demoDisk returns the sample disk's raw content: a boot sector, text and
// random data at a few places, and zeros elsewhere.
func demoDisk() []byte {
	disk := make([]byte, demoSize)
	copy(disk, "snapfs demo disk: this sector plays the boot record")
	disk[510], disk[511] = 0x55, 0xaa
	for i, off := range []int{1 << 20, 9 << 20, 33<<20 + 4096} {
		copy(disk[off:], bytes.Repeat([]byte(fmt.Sprintf("block %d of the demo disk. ", i)), 2000))
	}
	rng := rand.New(rand.NewPCG(1, 2))
	for i := 48 << 20; i < 50<<20; i += 8 {
		v := rng.Uint64()
		for b := range 8 {
			disk[i+b] = byte(v >> (8 * b))
		}
	}
	copy(disk[demoSize-512:], "the last sector")
	return disk
}

func runDemo(c *cli.Context) error {
	dir := "demo-bucket"
	if c.NArg() > 0 {
		dir = c.Args().First()
	}
	abs, err := filepath.Abs(dir)
	if err != nil {
		return err
	}
	if err := os.MkdirAll(abs, 0o755); err != nil {
		return err
	}
	disk := demoDisk()
	img := filepath.Join(abs, "sample.qcow2")
	f, err := os.Create(img)
	if err != nil {
		return err
	}
	st, err := qcow2.Write(f, bytes.NewReader(disk), int64(len(disk)), qcow2.WriteOptions{})
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return err
	}
	url := "file://" + img
	fmt.Printf("Made %s: a %s disk with %d allocated clusters, in the file:// bucket %s.\n\n",
		url, humanSize(st.VirtualSize), st.AllocatedClusters, abs)

	app := newApp()
	run := func(args ...string) error {
		return app.RunContext(c.Context, interspersed(app, append([]string{"snapfs"}, args...)))
	}
	for _, args := range [][]string{{"info", url}, {"map", url}, {"check", url}} {
		fmt.Printf("$ snapfs %s %s\n", args[0], args[1])
		if err := run(args...); err != nil {
			return fmt.Errorf("snapfs %s: %w", args[0], err)
		}
		fmt.Println()
	}

	raw := filepath.Join(abs, "sample.raw")
	fmt.Printf("$ snapfs cat %s -o %s\n", url, raw)
	if err := run("cat", url, "-o", raw); err != nil {
		return fmt.Errorf("snapfs cat: %w", err)
	}
	got, err := sha256File(raw)
	if err != nil {
		return err
	}
	want := sha256.Sum256(disk)
	if got != hex.EncodeToString(want[:]) {
		return fmt.Errorf("read-back mismatch: %s has sha256 %s, the source disk %x", raw, got, want)
	}
	fmt.Printf("sha256 %s: the read-back equals the source disk.\n", got)
	return nil
}

func sha256File(path string) (string, error) {
	f, err := os.Open(path)
	if err != nil {
		return "", err
	}
	defer f.Close()
	h := sha256.New()
	if _, err := io.Copy(h, f); err != nil {
		return "", err
	}
	return hex.EncodeToString(h.Sum(nil)), nil
}
