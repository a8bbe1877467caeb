// @peculiar/x509 resolves its ASN.1 providers through tsyringe, which needs the Reflect metadata API.
import 'reflect-metadata'
import { X509Certificate as NodeX509, createPrivateKey, randomBytes, webcrypto, type KeyObject } from 'node:crypto'
import { isIP } from 'node:net'
import { createSecureContext, type SecureContext } from 'node:tls'
import * as x509 from '@peculiar/x509'
import { LRUCache } from 'lru-cache'
import { ConfigError } from '../../src/errors.ts'

/**
 * The operator's CA, used to answer intercepted CONNECT tunnels with a
 * certificate for the host the client asked for. One leaf key pair serves
 * every host (generating keys per host buys nothing here: the CA key is the
 * secret that matters); certificates are made on first use and cached.
 */
export interface CertificateAuthority {
  /** TLS context presenting a certificate for `host` (a DNS name or IP literal) signed by the CA. */
  contextFor: (host: string) => Promise<SecureContext>
}

export interface CertificateAuthorityInit {
  certPem: string
  keyPem: string
  /** How long a host certificate is valid. Default 7 days; cached for a seventh of that. */
  validityMs?: number
}

type WebCrypto = typeof webcrypto
const crypto: WebCrypto = webcrypto
/** @peculiar/x509 is typed against the DOM's Crypto; Node's webcrypto is that object. */
const x509Crypto = webcrypto as unknown as Parameters<typeof x509.X509CertificateGenerator.create>[1]

export async function createCertificateAuthority (init: CertificateAuthorityInit): Promise<CertificateAuthority> {
  let caCert: NodeX509
  try {
    caCert = new NodeX509(init.certPem)
  } catch (err) {
    throw new ConfigError('proxy.caCert', `not a PEM certificate: ${(err as Error).message}`)
  }
  if (!caCert.ca) throw new ConfigError('proxy.caCert', 'the certificate is not a CA (basicConstraints CA:TRUE is missing)')
  let caKeyObject: KeyObject
  try {
    caKeyObject = createPrivateKey(init.keyPem)
  } catch (err) {
    throw new ConfigError('proxy.caKey', `not a PEM private key: ${(err as Error).message}`)
  }
  if (!caCert.checkPrivateKey(caKeyObject)) throw new ConfigError('proxy.caKey', 'the key does not belong to proxy.caCert')
  const algorithm = signingAlgorithm(caKeyObject)
  const caKey = await crypto.subtle.importKey('pkcs8', caKeyObject.export({ type: 'pkcs8', format: 'der' }), algorithm.importParams, false, ['sign'])
  const issuer = new x509.X509Certificate(init.certPem)
  const authorityKeyId = await x509.AuthorityKeyIdentifierExtension.create(issuer, false, x509Crypto)

  const leaf = await crypto.subtle.generateKey({ name: 'ECDSA', namedCurve: 'P-256' }, true, ['sign', 'verify'])
  const leafKeyPem = toPem('PRIVATE KEY', await crypto.subtle.exportKey('pkcs8', leaf.privateKey))
  const validityMs = init.validityMs ?? 7 * 24 * 3600_000
  const contexts = new LRUCache<string, Promise<SecureContext>>({ max: 512, ttl: Math.floor(validityMs / 7) })

  async function issue (host: string): Promise<SecureContext> {
    const now = Date.now()
    const ip = isIP(host) !== 0
    const cert = await x509.X509CertificateGenerator.create({
      // Positive, 16 random bytes: unique per certificate as RFC 5280 asks.
      serialNumber: '01' + randomBytes(15).toString('hex'),
      subject: [{ CN: [ip ? 'damselfly' : host.slice(0, 64)] }],
      issuer: issuer.subject,
      notBefore: new Date(now - 3600_000),
      notAfter: new Date(now + validityMs),
      signingAlgorithm: algorithm.signParams,
      publicKey: leaf.publicKey,
      signingKey: caKey,
      extensions: [
        new x509.BasicConstraintsExtension(false, undefined, true),
        new x509.KeyUsagesExtension(x509.KeyUsageFlags.digitalSignature | x509.KeyUsageFlags.keyEncipherment, true),
        new x509.ExtendedKeyUsageExtension([x509.ExtendedKeyUsage.serverAuth]),
        new x509.SubjectAlternativeNameExtension([{ type: ip ? 'ip' : 'dns', value: host }]),
        authorityKeyId
      ]
    }, x509Crypto)
    return createSecureContext({ key: leafKeyPem, cert: `${cert.toString('pem')}\n${init.certPem.trim()}\n` })
  }

  return {
    async contextFor (host) {
      const key = host.toLowerCase()
      let pending = contexts.get(key)
      if (pending === undefined) {
        pending = issue(key)
        contexts.set(key, pending)
        pending.catch(() => { contexts.delete(key) })
      }
      return pending
    }
  }
}

function signingAlgorithm (key: KeyObject): { importParams: webcrypto.RsaHashedImportParams | webcrypto.EcKeyImportParams, signParams: webcrypto.Algorithm | webcrypto.EcdsaParams } {
  if (key.asymmetricKeyType === 'rsa') {
    return { importParams: { name: 'RSASSA-PKCS1-v1_5', hash: 'SHA-256' }, signParams: { name: 'RSASSA-PKCS1-v1_5', hash: 'SHA-256' } as webcrypto.Algorithm }
  }
  if (key.asymmetricKeyType === 'ec') {
    const curve = { prime256v1: 'P-256', secp384r1: 'P-384', secp521r1: 'P-521' }[key.asymmetricKeyDetails?.namedCurve ?? '']
    if (curve === undefined) throw new ConfigError('proxy.caKey', `EC curve ${key.asymmetricKeyDetails?.namedCurve ?? '?'} is not supported (use P-256, P-384 or P-521)`)
    const hash = curve === 'P-256' ? 'SHA-256' : curve === 'P-384' ? 'SHA-384' : 'SHA-512'
    return { importParams: { name: 'ECDSA', namedCurve: curve }, signParams: { name: 'ECDSA', hash } }
  }
  throw new ConfigError('proxy.caKey', `key type ${key.asymmetricKeyType ?? '?'} is not supported (use RSA or EC)`)
}

function toPem (label: string, der: ArrayBuffer): string {
  const b64 = Buffer.from(der).toString('base64').replace(/.{1,64}/g, '$&\n')
  return `-----BEGIN ${label}-----\n${b64}-----END ${label}-----\n`
}
