package main

import (
	"encoding/json"
	"fmt"
	"os"

	"github.com/urfave/cli/v2"

	"github.com/snapfs/snapfs/cache"
)

func statusCommand() *cli.Command {
	return &cli.Command{
		Name:      "status",
		Usage:     "show the progress of a local volume (snapfs import) from its state file",
		ArgsUsage: "TARGET",
		Description: "Reads TARGET.snapfs-state (or --state): the source, its ETag, the bytes local and " +
			"whether the volume is complete. Exit 0 when complete, 3 while not.",
		Flags: withGlobal(
			&cli.StringFlag{Name: "state", Usage: "the state file `PATH` (default: TARGET.snapfs-state)"},
			&cli.BoolFlag{Name: "json", Usage: "print JSON"},
		),
		Action: runStatus,
	}
}

// statusIncomplete is the exit status of status for a volume still filling.
const statusIncomplete = 3

func runStatus(c *cli.Context) error {
	if c.NArg() != 1 {
		return cli.Exit("status takes one TARGET (see snapfs status --help)", 2)
	}
	target := c.Args().First()
	path := c.String("state")
	if path == "" {
		path = cache.StatePathFor(target)
	}
	st, err := cache.ReadVolumeState(path)
	if err != nil {
		return err
	}
	if c.Bool("json") {
		out := struct {
			Target string `json:"target"`
			*cache.VolumeState
		}{target, st}
		enc := json.NewEncoder(os.Stdout)
		enc.SetIndent("", "  ")
		if err := enc.Encode(out); err != nil {
			return err
		}
	} else {
		state := "filling"
		if st.Complete {
			state = "complete"
		}
		pct := 100 * float64(st.PresentBytes) / float64(max(st.TargetSize, 1))
		fmt.Printf("target:       %s\n", target)
		fmt.Printf("source:       %s\n", st.URL)
		fmt.Printf("etag:         %s\n", st.ETag)
		fmt.Printf("virtual size: %s (%d bytes)\n", humanSize(st.VirtualSize), st.VirtualSize)
		fmt.Printf("local:        %s of %s (%.1f%%)\n", humanSize(st.PresentBytes), humanSize(st.TargetSize), pct)
		fmt.Printf("state:        %s\n", state)
		if st.Modified {
			fmt.Printf("modified:     yes (written by clients)\n")
		}
		fmt.Printf("updated:      %s\n", st.Updated)
	}
	if !st.Complete {
		return cli.Exit("", statusIncomplete)
	}
	return nil
}
