/*
 * Hearth's Mosquitto plugin: the client certificate's identity is the MQTT username.
 *
 * Mosquitto 2.0 offers no option that does this *and* keeps plugin authentication:
 * `use_identity_as_username true` skips the dynamic-security plugin altogether (no
 * password, no client id binding). This plugin runs first on every CONNECT (it is loaded
 * before dynamic-security) and refuses the connection unless the certificate that passed
 * the TLS handshake has exactly one subject commonName and it equals the username,
 * byte for byte, and unless the client id is the username or starts with the username and
 * a '-' (units: exactly their device id, which dynamic-security also enforces; service
 * identities: "hearth-ingest-0" and the like, so several workers can run side by side but
 * none can take a unit's client id and push the unit off). When both hold it defers, and
 * the dynamic-security plugin then checks the password, binds unit client ids and applies
 * the ACLs. So a connection needs the unit's private key, its certificate (CA + CRL
 * checked by the listener) *and* its own broker secret; one unit's certificate with
 * another unit's secret is refused.
 *
 * Mosquitto 2.0.11 asks basic-auth callbacks in the order the plugins were loaded and
 * stops at the first answer other than MOSQ_ERR_PLUGIN_DEFER (tests pin both halves).
 * On a config reload it asks again for every session, offline persistent ones included,
 * which have no certificate to show: those are left to dynamic-security (a test pins
 * that a reload refuses nobody and an offline unit keeps its queued command).
 *
 * It also counts what a unit tries outside its own topics. On every PUBLISH and SUBSCRIBE
 * of a unit (a username of 32 lowercase hex digits) whose topic or filter is not under
 * "hearth/v1/d/<its id>/", it answers MOSQ_ERR_ACL_DENIED (what dynamic-security would
 * answer: it grants units nothing else) and logs "hearth-acl: denied ..." with the unit's
 * id - Mosquitto itself reports ACL denials only at debug level. The lines are rate
 * limited (ACL_LOG_PER_SECOND); what was not logged one by one is logged as a count.
 * Everything else is deferred to dynamic-security, which still applies the exact rules.
 *
 * Built by hearth.service.broker_plugin with the system C compiler (Debian packages
 * mosquitto-dev, libmosquitto-dev, libssl-dev). See docs/adr/0001-broker-identity-binding.md.
 */
#define _POSIX_C_SOURCE 200809L /* strnlen, clock_gettime */
#include <stddef.h>
#include <string.h>
#include <time.h>

#include <openssl/asn1.h>
#include <openssl/objects.h>
#include <openssl/x509.h>

#include <mosquitto.h>
#include <mosquitto_broker.h>
#include <mosquitto_plugin.h>

#define HEARTH_MAX_IDENTITY 64
#define HEARTH_DEVICE_ID_LEN 32
#define HEARTH_TOPIC_PREFIX "hearth/v1/d/"
#define ACL_LOG_PER_SECOND 20

static mosquitto_plugin_id_t *plugin_id = NULL;

/* ACL denial log rate limit (Mosquitto runs plugins on its one main thread). */
static time_t acl_window = 0;          /* the monotonic second being counted */
static unsigned long acl_logged = 0;   /* denials logged one by one in that second */
static unsigned long acl_unlogged = 0; /* denials not logged one by one, not yet reported */

/* 1 when the certificate's only subject CN equals `username` exactly, else 0. */
static int cn_matches(X509 *cert, const char *username)
{
    X509_NAME *subject = X509_get_subject_name(cert);
    if (subject == NULL) {
        return 0;
    }
    int index = X509_NAME_get_index_by_NID(subject, NID_commonName, -1);
    if (index < 0 || X509_NAME_get_index_by_NID(subject, NID_commonName, index) >= 0) {
        return 0; /* no CN, or more than one */
    }
    ASN1_STRING *cn = X509_NAME_ENTRY_get_data(X509_NAME_get_entry(subject, index));
    if (cn == NULL) {
        return 0;
    }
    const unsigned char *bytes = ASN1_STRING_get0_data(cn);
    int length = ASN1_STRING_length(cn);
    size_t wanted = strnlen(username, HEARTH_MAX_IDENTITY + 1);
    if (bytes == NULL || length <= 0 || length > HEARTH_MAX_IDENTITY
            || (size_t)length != wanted) {
        return 0;
    }
    return memcmp(bytes, username, wanted) == 0;
}

/* 1 when `client_id` is `username` or `username` followed by '-' and more, else 0. */
static int client_id_allowed(const char *client_id, const char *username)
{
    size_t n = strnlen(username, HEARTH_MAX_IDENTITY + 1);
    if (client_id == NULL || n > HEARTH_MAX_IDENTITY || strncmp(client_id, username, n) != 0) {
        return 0;
    }
    return client_id[n] == '\0' || (client_id[n] == '-' && client_id[n + 1] != '\0');
}

static int on_basic_auth(int event, void *event_data, void *userdata)
{
    (void)event;
    (void)userdata;
    struct mosquitto_evt_basic_auth *ed = event_data;
    const char *username = ed->username;
    X509 *cert = mosquitto_client_certificate(ed->client); /* a new reference: freed here */
    int has_cert = cert != NULL;
    int match = (username != NULL && has_cert) ? cn_matches(cert, username) : 0;
    if (has_cert) {
        X509_free(cert);
    }
    if (!has_cert) {
        /* The listener has require_certificate: every live connection has shown one
         * before it can send CONNECT. No certificate here means Mosquitto is checking a
         * persistent session that is offline again (it re-checks every session on a
         * config reload, SIGHUP); that session shows its certificate when it reconnects.
         * dynamic-security still checks its password. */
        return MOSQ_ERR_PLUGIN_DEFER;
    }
    const char *client_id = mosquitto_client_id(ed->client);
    const char *why = NULL;
    if (!match) {
        why = "the username is not the certificate's common name";
    } else if (!client_id_allowed(client_id, username)) {
        why = "the client id is not the username or the username and a '-' suffix";
    }
    if (why == NULL) {
        return MOSQ_ERR_PLUGIN_DEFER; /* identity bound: dynamic-security decides the rest */
    }
    const char *address = mosquitto_client_address(ed->client);
    mosquitto_log_printf(MOSQ_LOG_NOTICE, "hearth-identity: refused client %s from %s: %s",
            client_id ? client_id : "?", address ? address : "?", why);
    return MOSQ_ERR_AUTH;
}

/* 1 when `username` is a unit's identity (its device id: 32 lowercase hex digits). */
static int is_unit(const char *username)
{
    if (username == NULL) {
        return 0;
    }
    for (int i = 0; i < HEARTH_DEVICE_ID_LEN; i++) {
        char c = username[i];
        if (!((c >= '0' && c <= '9') || (c >= 'a' && c <= 'f'))) {
            return 0; /* also stops at the terminating NUL of a shorter name */
        }
    }
    return username[HEARTH_DEVICE_ID_LEN] == '\0';
}

/* 1 when `topic` (a topic or a filter) is under "hearth/v1/d/<device_id>/". */
static int own_topic(const char *topic, const char *device_id)
{
    size_t p = sizeof(HEARTH_TOPIC_PREFIX) - 1;
    return topic != NULL && strncmp(topic, HEARTH_TOPIC_PREFIX, p) == 0
        && strncmp(topic + p, device_id, HEARTH_DEVICE_ID_LEN) == 0
        && topic[p + HEARTH_DEVICE_ID_LEN] == '/';
}

static time_t monotonic_second(void)
{
    struct timespec now;
    clock_gettime(CLOCK_MONOTONIC, &now);
    return now.tv_sec;
}

/* Report the denials of past seconds that were not logged one by one. */
static void report_unlogged(time_t now)
{
    if (now != acl_window) {
        if (acl_unlogged > 0) {
            mosquitto_log_printf(MOSQ_LOG_NOTICE,
                    "hearth-acl: %lu more denials were not logged one by one", acl_unlogged);
        }
        acl_window = now;
        acl_logged = 0;
        acl_unlogged = 0;
    }
}

static int on_acl_check(int event, void *event_data, void *userdata)
{
    (void)event;
    (void)userdata;
    struct mosquitto_evt_acl_check *ed = event_data;
    if (ed->access != MOSQ_ACL_WRITE && ed->access != MOSQ_ACL_SUBSCRIBE) {
        return MOSQ_ERR_PLUGIN_DEFER;
    }
    const char *username = mosquitto_client_username(ed->client);
    if (!is_unit(username) || own_topic(ed->topic, username)) {
        return MOSQ_ERR_PLUGIN_DEFER;
    }
    report_unlogged(monotonic_second());
    if (acl_logged < ACL_LOG_PER_SECOND) {
        acl_logged++;
        mosquitto_log_printf(MOSQ_LOG_NOTICE,
                "hearth-acl: denied %s by unit %s: not one of its own topics",
                ed->access == MOSQ_ACL_WRITE ? "publish" : "subscribe", username);
    } else {
        acl_unlogged++;
    }
    return MOSQ_ERR_ACL_DENIED;
}

static int on_tick(int event, void *event_data, void *userdata)
{
    (void)event;
    (void)event_data;
    (void)userdata;
    if (acl_unlogged > 0) {
        report_unlogged(monotonic_second());
    }
    return MOSQ_ERR_SUCCESS;
}

int mosquitto_plugin_version(int supported_version_count, const int *supported_versions)
{
    for (int i = 0; i < supported_version_count; i++) {
        if (supported_versions[i] == 5) {
            return 5;
        }
    }
    return -1;
}

int mosquitto_plugin_init(mosquitto_plugin_id_t *identifier, void **userdata,
                          struct mosquitto_opt *options, int option_count)
{
    (void)userdata;
    (void)options;
    (void)option_count;
    plugin_id = identifier;
    int rc = mosquitto_callback_register(plugin_id, MOSQ_EVT_BASIC_AUTH, on_basic_auth,
                                         NULL, NULL);
    if (rc == MOSQ_ERR_SUCCESS) {
        rc = mosquitto_callback_register(plugin_id, MOSQ_EVT_ACL_CHECK, on_acl_check,
                                         NULL, NULL);
    }
    if (rc == MOSQ_ERR_SUCCESS) {
        rc = mosquitto_callback_register(plugin_id, MOSQ_EVT_TICK, on_tick, NULL, NULL);
    }
    if (rc == MOSQ_ERR_SUCCESS) {
        mosquitto_log_printf(MOSQ_LOG_INFO,
                "hearth-identity: certificate CN = username, client id = username[-suffix]; "
                "units only on their own topics");
    }
    return rc;
}

int mosquitto_plugin_cleanup(void *userdata, struct mosquitto_opt *options, int option_count)
{
    (void)userdata;
    (void)options;
    (void)option_count;
    mosquitto_callback_unregister(plugin_id, MOSQ_EVT_TICK, on_tick, NULL);
    mosquitto_callback_unregister(plugin_id, MOSQ_EVT_ACL_CHECK, on_acl_check, NULL);
    return mosquitto_callback_unregister(plugin_id, MOSQ_EVT_BASIC_AUTH, on_basic_auth, NULL);
}
