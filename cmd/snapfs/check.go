package main

import (
	"fmt"
	"io"
	"os"

	"github.com/urfave/cli/v2"

	"github.com/snapfs/snapfs/qcow2"
)

// Exit statuses of check, as qemu-img check has them.
const (
	checkCorrupt = 2
	checkLeaks   = 3
)

func checkCommand() *cli.Command {
	return &cli.Command{
		Name:      "check",
		Usage:     "walk all metadata and list every problem, like qemu-img check",
		ArgsUsage: "URL",
		Description: "Exit status: 0 clean, 1 the image could not be opened, " +
			"2 corruption found, 3 leaked clusters only.",
		Flags:  withGlobal(&cli.BoolFlag{Name: "json", Usage: "print JSON like qemu-img check --output=json"}),
		Action: withImage(runCheck),
	}
}

func runCheck(c *cli.Context, im *qcow2.Image) error {
	rep, err := im.Check(c.Context)
	if err != nil {
		return err
	}
	if c.Bool("json") {
		err = writeJSON(os.Stdout, checkJSON(im, rep))
	} else {
		printCheck(os.Stdout, im, rep)
	}
	if err != nil {
		return err
	}
	switch {
	case rep.Corrupt():
		return cli.Exit("", checkCorrupt)
	case len(rep.Leaks) > 0:
		return cli.Exit("", checkLeaks)
	}
	return nil
}

func checkJSON(im *qcow2.Image, rep *qcow2.CheckReport) map[string]any {
	problems := []map[string]any{}
	add := func(sev string, ps []qcow2.Problem) {
		for _, p := range ps {
			m := map[string]any{"severity": sev, "kind": p.Kind, "message": p.Message}
			if p.HostOffset >= 0 {
				m["host-offset"] = p.HostOffset
			}
			if p.GuestOffset >= 0 {
				m["guest-offset"] = p.GuestOffset
			}
			problems = append(problems, m)
		}
	}
	add("error", rep.Errors)
	add("leak", rep.Leaks)
	add("warning", rep.Warnings)
	return map[string]any{
		"filename":            im.URL(),
		"format":              "qcow2",
		"check-errors":        0,
		"corruptions":         len(rep.Errors),
		"leaks":               len(rep.Leaks),
		"image-end-offset":    rep.ImageEndOffset,
		"total-clusters":      rep.CheckedClusters,
		"allocated-clusters":  rep.AllocatedClusters,
		"fragmented-clusters": rep.FragmentedClusters,
		"compressed-clusters": rep.CompressedClusters,
		"problems":            problems,
	}
}

func printCheck(w io.Writer, im *qcow2.Image, rep *qcow2.CheckReport) {
	for _, p := range rep.Errors {
		fmt.Fprintf(w, "ERROR %s\n", p.Message)
	}
	for _, p := range rep.Leaks {
		fmt.Fprintf(w, "Leaked cluster: %s\n", p.Message)
	}
	for _, p := range rep.Warnings {
		fmt.Fprintf(w, "Warning: %s\n", p.Message)
	}
	if len(rep.Errors) > 0 || len(rep.Leaks) > 0 {
		fmt.Fprintln(w)
	}
	switch {
	case len(rep.Errors) > 0:
		fmt.Fprintf(w, "%d errors were found on the image.\nData may be corrupted, or further writes to the image may corrupt it.\n", len(rep.Errors))
	case len(rep.Leaks) > 0:
		fmt.Fprintf(w, "%d leaked clusters were found on the image.\nThis means waste of disk space, but no harm to data.\n", len(rep.Leaks))
	default:
		fmt.Fprintln(w, "No errors were found on the image.")
	}
	if rep.CheckedClusters > 0 {
		pct := func(n, of int64) float64 {
			if of == 0 {
				return 0
			}
			return 100 * float64(n) / float64(of)
		}
		fmt.Fprintf(w, "%d/%d = %.2f%% allocated, %.2f%% fragmented, %.2f%% compressed clusters\n",
			rep.AllocatedClusters, rep.CheckedClusters, pct(rep.AllocatedClusters, rep.CheckedClusters),
			pct(rep.FragmentedClusters, rep.AllocatedClusters), pct(rep.CompressedClusters, rep.AllocatedClusters))
	}
	fmt.Fprintf(w, "Image end offset: %d\n", rep.ImageEndOffset)
}
