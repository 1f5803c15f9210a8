# A shell implementation of the part of OpenWrt's /lib/functions.sh that
# packaging/openwrt/warren/files/warren.init uses: config_load, config_get,
# config_get_bool. Debian has no uci, so this reads the UCI file itself, with
# UCI's syntax (config/option/list lines; values bare, 'single' or "double"
# quoted, '\'' and \" escapes; # comments; a repeated option replaces the
# earlier one) and functions.sh's semantics (values in CONFIG_<section>_<option>,
# an empty value gives the default, booleans 1/on/true/yes/enabled and
# 0/off/false/no/disabled). Unnamed sections are not supported (warren's
# config names its one section). Honours UCI_CONFIG_DIR as uci's -c does.
# shellcheck shell=dash

# config_load PACKAGE: reads $UCI_CONFIG_DIR/PACKAGE (default /etc/config).
config_load() {
	local file="${UCI_CONFIG_DIR:-/etc/config}/$1" assignments
	[ -f "$file" ] || return 1
	assignments=$(awk '
		# Splits a UCI line into words the way uci does: quotes group and
		# are dropped, adjacent quoted and bare parts join into one word.
		function words(line,   i, c, q, w, n, inword) {
			n = 0; w = ""; q = ""; inword = 0
			for (i = 1; i <= length(line); i++) {
				c = substr(line, i, 1)
				if (q == "\047") { if (c == "\047") q = ""; else w = w c; continue }
				if (q == "\"") {
					if (c == "\\" && i < length(line)) { i++; w = w substr(line, i, 1); continue }
					if (c == "\"") q = ""; else w = w c
					continue
				}
				if (c == "#") break
				if (c == " " || c == "\t") { if (inword) { W[++n] = w; w = ""; inword = 0 } continue }
				inword = 1
				if (c == "\047" || c == "\"") { q = c; continue }
				if (c == "\\" && i < length(line)) { i++; w = w substr(line, i, 1); continue }
				w = w c
			}
			if (q != "") { printf "config_load: unterminated quote in %s line %d\n", FILENAME, NR > "/dev/stderr"; exit 1 }
			if (inword) W[++n] = w
			return n
		}
		function sq(s) { gsub(/\047/, "\047\\\047\047", s); return "\047" s "\047" }
		{
			n = words($0)
			if (n == 0) next
			if (W[1] == "package") next
			if (W[1] == "config") {
				if (n < 3) { printf "config_load: unnamed section in %s line %d\n", FILENAME, NR > "/dev/stderr"; exit 1 }
				sec = W[3]
				if (sec !~ /^[A-Za-z0-9_]+$/) { printf "config_load: bad section name %s\n", sec > "/dev/stderr"; exit 1 }
				print "CONFIG_" sec "_TYPE=" sq(W[2])
				next
			}
			if (W[1] == "option" || W[1] == "list") {
				if (sec == "" || n < 3 || W[2] !~ /^[A-Za-z0-9_]+$/) { printf "config_load: bad line %d in %s\n", NR, FILENAME > "/dev/stderr"; exit 1 }
				var = "CONFIG_" sec "_" W[2]
				if (W[1] == "list" && (var in listed)) print var "=\"$" var " \"" sq(W[3])
				else print var "=" sq(W[3])
				if (W[1] == "list") listed[var] = 1
				next
			}
			printf "config_load: unknown keyword %s in %s line %d\n", W[1], FILENAME, NR > "/dev/stderr"; exit 1
		}' "$file") || return 1
	eval "$assignments"
}

# config_get VAR SECTION OPTION [DEFAULT]
config_get() {
	local value
	eval "value=\${CONFIG_$2_$3:-}"
	[ -n "$value" ] || value="${4:-}"
	eval "$1=\$value"
}

# config_get_bool VAR SECTION OPTION [DEFAULT]
config_get_bool() {
	local raw
	config_get raw "$2" "$3" "${4:-}"
	case "$raw" in
	1 | on | true | yes | enabled) raw=1 ;;
	0 | off | false | no | disabled) raw=0 ;;
	*) raw="${4:-}" ;;
	esac
	eval "$1=\$raw"
}
