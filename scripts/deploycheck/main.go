// deploycheck validates docker/ without a Docker engine, with the libraries
// Docker itself uses, and prints what it found as JSON for scripts/deploy_check.py:
//
//	deploycheck dockerfile CONTEXT DOCKERFILE
//	    BuildKit's Dockerfile parser and its lint rules (`docker build --check`),
//	    every stage and instruction, and the build context after .dockerignore.
//	deploycheck compose FILE
//	    compose-go, the loader of `docker compose config`: schema, interpolation,
//	    references between services, volumes and networks; the resolved project.
//
// Exit status: 0 with a JSON report on stdout (problems are in the report),
// 2 when the input cannot be read at all.
package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io/fs"
	"os"
	"path"
	"path/filepath"
	"runtime"
	"sort"
	"strings"

	"github.com/compose-spec/compose-go/v2/cli"
	"github.com/moby/buildkit/client/llb"
	"github.com/moby/buildkit/client/llb/sourceresolver"
	"github.com/moby/buildkit/frontend/dockerfile/dockerfile2llb"
	"github.com/moby/buildkit/frontend/dockerfile/instructions"
	"github.com/moby/buildkit/frontend/dockerfile/parser"
	"github.com/moby/buildkit/frontend/dockerfile/shell"
	"github.com/moby/patternmatcher"
	"github.com/moby/patternmatcher/ignorefile"
	digest "github.com/opencontainers/go-digest"
)

func main() {
	if len(os.Args) < 2 {
		usage()
	}
	var report any
	var err error
	switch os.Args[1] {
	case "dockerfile":
		if len(os.Args) != 4 {
			usage()
		}
		report, err = checkDockerfile(os.Args[2], os.Args[3])
	case "compose":
		if len(os.Args) != 3 {
			usage()
		}
		report, err = checkCompose(os.Args[2])
	default:
		usage()
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "deploycheck:", err)
		os.Exit(2)
	}
	out := json.NewEncoder(os.Stdout)
	out.SetIndent("", "  ")
	if err := out.Encode(report); err != nil {
		fmt.Fprintln(os.Stderr, "deploycheck:", err)
		os.Exit(2)
	}
}

func usage() {
	fmt.Fprintln(os.Stderr, "usage: deploycheck dockerfile CONTEXT DOCKERFILE | deploycheck compose FILE")
	os.Exit(2)
}

// ---------------------------------------------------------------- Dockerfile

type lintWarning struct {
	Rule    string `json:"rule"`
	Message string `json:"message"`
	Line    int    `json:"line"`
}

type command struct {
	Instruction string            `json:"instruction"` // lower case: run, copy, user, ...
	Line        int               `json:"line"`
	Source      string            `json:"source"` // the instruction as written
	Args        []string          `json:"args"`
	ShellForm   bool              `json:"shell_form"` // RUN/CMD/ENTRYPOINT run through /bin/sh -c
	From        string            `json:"from"`       // COPY --from
	Chown       string            `json:"chown"`
	Dest        string            `json:"dest"`
	Env         map[string]string `json:"env"`
	Health      *health           `json:"health"`
}

type health struct {
	Test        []string `json:"test"`
	Interval    string   `json:"interval"`
	Timeout     string   `json:"timeout"`
	StartPeriod string   `json:"start_period"`
	Retries     int      `json:"retries"`
}

type stage struct {
	Name     string    `json:"name"`
	Base     string    `json:"base"`  // as written
	Image    string    `json:"image"` // with the global ARG defaults substituted
	Line     int       `json:"line"`
	Commands []command `json:"commands"`
}

type dockerfileReport struct {
	Error    string            `json:"error"` // the Dockerfile does not parse or would not build
	Lint     []lintWarning     `json:"lint"`
	MetaArgs map[string]string `json:"meta_args"`
	Stages   []stage           `json:"stages"`
	// the build context as the engine would receive it (after .dockerignore)
	IgnoreFile     string   `json:"ignore_file"`
	ContextFiles   []string `json:"context_files"`
	ContextBytes   int64    `json:"context_bytes"`
	MissingSources []string `json:"missing_sources"` // COPY/ADD sources the context lacks
}

// offlineResolver answers BuildKit's base-image lookups without a registry: a
// non-empty linux image of the build platform with Docker's default PATH.
type offlineResolver struct{}

func (offlineResolver) ResolveImageConfig(_ context.Context, ref string, opt sourceresolver.Opt) (string, digest.Digest, []byte, error) {
	osName, arch := "linux", runtime.GOARCH
	if opt.ImageOpt != nil && opt.ImageOpt.Platform != nil {
		osName, arch = opt.ImageOpt.Platform.OS, opt.ImageOpt.Platform.Architecture
	}
	config := map[string]any{
		"os":           osName,
		"architecture": arch,
		"rootfs":       map[string]any{"type": "layers", "diff_ids": []string{string(digest.FromString(ref))}},
		"config": map[string]any{
			"Env": []string{"PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"},
		},
	}
	data, err := json.Marshal(config)
	return ref, "", data, err
}

func checkDockerfile(contextDir, dockerfile string) (*dockerfileReport, error) {
	data, err := os.ReadFile(dockerfile)
	if err != nil {
		return nil, err
	}
	report := &dockerfileReport{Lint: []lintWarning{}, MetaArgs: map[string]string{}, Stages: []stage{}}

	// the lint pass of `docker build --check`, every stage, base images not fetched
	sourceMap := llb.NewSourceMap(nil, dockerfile, "Dockerfile", data)
	sourceMap.Definition = &llb.Definition{}
	opt := dockerfile2llb.ConvertOpt{SourceMap: sourceMap, MetaResolver: offlineResolver{}}
	results, err := dockerfile2llb.DockerfileLint(context.Background(), data, opt)
	if err != nil {
		return nil, err
	}
	for _, w := range results.Warnings {
		line := 0
		if w.Location != nil && len(w.Location.Ranges) > 0 && w.Location.Ranges[0].Start != nil {
			line = int(w.Location.Ranges[0].Start.Line)
		}
		report.Lint = append(report.Lint, lintWarning{Rule: w.RuleName, Message: w.Detail, Line: line})
	}
	if results.Error != nil {
		report.Error = results.Error.Message
	}

	parsed, err := parser.Parse(strings.NewReader(string(data)))
	if err != nil {
		report.Error = err.Error()
		return report, nil
	}
	for _, w := range parsed.Warnings {
		line := 0
		if w.Location != nil {
			line = w.Location.Start.Line
		}
		report.Lint = append(report.Lint, lintWarning{Rule: "Parser", Message: w.Short, Line: line})
	}
	stages, metaArgs, err := instructions.Parse(parsed.AST, nil)
	if err != nil {
		report.Error = err.Error()
		return report, nil
	}
	for _, meta := range metaArgs {
		for _, arg := range meta.Args {
			if arg.Value != nil {
				report.MetaArgs[arg.Key] = *arg.Value
			}
		}
	}
	lex := shell.NewLex(parsed.EscapeToken)
	env := shell.EnvsFromSlice(nil)
	for key, value := range report.MetaArgs {
		env = shell.EnvsFromSlice(append(envSlice(env), key+"="+value))
	}
	for _, st := range stages {
		image, _, err := lex.ProcessWord(st.BaseName, env)
		if err != nil {
			image = st.BaseName
		}
		out := stage{Name: st.Name, Base: st.BaseName, Image: image, Line: firstLine(st.Location), Commands: []command{}}
		for _, cmd := range st.Commands {
			out.Commands = append(out.Commands, describe(cmd))
		}
		report.Stages = append(report.Stages, out)
	}
	if err := describeContext(report, contextDir, dockerfile); err != nil {
		return nil, err
	}
	return report, nil
}

func envSlice(env shell.EnvGetter) []string {
	var out []string
	for _, key := range env.Keys() {
		value, _ := env.Get(key)
		out = append(out, key+"="+value)
	}
	return out
}

func firstLine(ranges []parser.Range) int {
	if len(ranges) == 0 {
		return 0
	}
	return ranges[0].Start.Line
}

func describe(cmd instructions.Command) command {
	out := command{Instruction: strings.ToLower(cmd.Name())}
	if located, ok := cmd.(interface{ Location() []parser.Range }); ok {
		out.Line = firstLine(located.Location())
	}
	if s, ok := cmd.(fmt.Stringer); ok {
		out.Source = s.String()
	}
	switch c := cmd.(type) {
	case *instructions.RunCommand:
		out.Args, out.ShellForm = c.CmdLine, c.PrependShell
	case *instructions.CmdCommand:
		out.Args, out.ShellForm = c.CmdLine, c.PrependShell
	case *instructions.EntrypointCommand:
		out.Args, out.ShellForm = c.CmdLine, c.PrependShell
	case *instructions.CopyCommand:
		out.Args, out.Dest, out.From, out.Chown = c.SourcePaths, c.DestPath, c.From, c.Chown
	case *instructions.AddCommand:
		out.Args, out.Dest, out.Chown = c.SourcePaths, c.DestPath, c.Chown
	case *instructions.UserCommand:
		out.Args = []string{c.User}
	case *instructions.WorkdirCommand:
		out.Args = []string{c.Path}
	case *instructions.ExposeCommand:
		out.Args = c.Ports
	case *instructions.EnvCommand:
		out.Env = map[string]string{}
		for _, kv := range c.Env {
			out.Env[kv.Key] = kv.Value
		}
	case *instructions.HealthCheckCommand:
		h := c.Health
		out.Health = &health{Test: h.Test, Interval: h.Interval.String(), Timeout: h.Timeout.String(),
			StartPeriod: h.StartPeriod.String(), Retries: h.Retries}
	}
	if out.Args == nil {
		out.Args = []string{}
	}
	return out
}

// describeContext lists the files `docker build CONTEXT` would send (BuildKit
// reads DOCKERFILE.dockerignore beside the Dockerfile first, then
// CONTEXT/.dockerignore) and the COPY/ADD sources that match none of them.
func describeContext(report *dockerfileReport, contextDir, dockerfile string) error {
	var patterns []string
	for _, candidate := range []string{dockerfile + ".dockerignore", filepath.Join(contextDir, ".dockerignore")} {
		f, err := os.Open(candidate)
		if err != nil {
			continue
		}
		patterns, err = ignorefile.ReadAll(f)
		f.Close()
		if err != nil {
			return err
		}
		report.IgnoreFile = candidate
		break
	}
	pm, err := patternmatcher.New(patterns)
	if err != nil {
		return err
	}
	report.ContextFiles = []string{}
	err = filepath.WalkDir(contextDir, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, err := filepath.Rel(contextDir, p)
		if err != nil || rel == "." {
			return err
		}
		rel = filepath.ToSlash(rel)
		ignored, err := pm.MatchesOrParentMatches(rel)
		if err != nil {
			return err
		}
		if ignored {
			if d.IsDir() && !mayReinclude(pm, rel) {
				return filepath.SkipDir
			}
			return nil
		}
		if !d.IsDir() {
			report.ContextFiles = append(report.ContextFiles, rel)
			if info, err := d.Info(); err == nil {
				report.ContextBytes += info.Size()
			}
		}
		return nil
	})
	if err != nil {
		return err
	}
	sort.Strings(report.ContextFiles)
	report.MissingSources = []string{}
	for _, st := range report.Stages {
		for _, cmd := range st.Commands {
			if (cmd.Instruction != "copy" && cmd.Instruction != "add") || cmd.From != "" {
				continue
			}
			for _, src := range cmd.Args {
				if !matchesAny(src, report.ContextFiles) {
					report.MissingSources = append(report.MissingSources,
						fmt.Sprintf("line %d: %s %s matches nothing in the build context", cmd.Line, strings.ToUpper(cmd.Instruction), src))
				}
			}
		}
	}
	return nil
}

// mayReinclude tells whether an exception pattern (!path) could match under
// an ignored directory, as the Docker CLI decides whether to walk into it.
func mayReinclude(pm *patternmatcher.PatternMatcher, dir string) bool {
	if !pm.Exclusions() {
		return false
	}
	prefix := dir + "/"
	for _, pattern := range pm.Patterns() {
		if !pattern.Exclusion() {
			continue
		}
		if strings.HasPrefix(pattern.String()+"/", prefix) || strings.ContainsAny(pattern.String(), "*?[") {
			return true
		}
	}
	return false
}

func matchesAny(src string, files []string) bool {
	src = strings.TrimPrefix(path.Clean("/"+filepath.ToSlash(src)), "/")
	if src == "" {
		return len(files) > 0
	}
	for _, f := range files {
		for candidate := f; candidate != "."; candidate = path.Dir(candidate) {
			if ok, _ := path.Match(src, candidate); ok {
				return true
			}
		}
	}
	return false
}

// ------------------------------------------------------------------- compose

type composeReport struct {
	Error   string          `json:"error"`
	Project json.RawMessage `json:"project"`
}

func checkCompose(file string) (*composeReport, error) {
	abs, err := filepath.Abs(file)
	if err != nil {
		return nil, err
	}
	if _, err := os.Stat(abs); err != nil {
		return nil, err
	}
	// as `docker compose -f FILE config` loads it, but with an empty
	// environment (plus a .env beside the file), so the result does not
	// depend on the shell it runs in; every profile is included
	opts, err := cli.NewProjectOptions([]string{abs},
		cli.WithWorkingDirectory(filepath.Dir(abs)),
		cli.WithEnv([]string{}),
		cli.WithDotEnv,
		cli.WithProfiles([]string{"*"}),
		cli.WithResolvedPaths(true),
	)
	if err != nil {
		return &composeReport{Error: err.Error()}, nil
	}
	project, err := opts.LoadProject(context.Background())
	if err != nil {
		return &composeReport{Error: err.Error()}, nil
	}
	data, err := project.MarshalJSON()
	if err != nil {
		return nil, err
	}
	return &composeReport{Project: data}, nil
}
